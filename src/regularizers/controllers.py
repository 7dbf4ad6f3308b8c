r"""Controllers: plain-Python state that sets a term's weight from one step to the next.

:class:`AdaptiveKLController` is the adaptive KL coefficient of Ziegler et al. (2019),
"Fine-Tuning Language Models from Human Preferences": the coefficient :math:`\beta` of a KL
penalty moves so that the measured KL tracks a target. Its ``value`` is a Python float, fed to
a :class:`~regularizers.Pipeline` as a call-time weight::

    loss, metrics = pipe(data, logprobs, weights={"sampled_kl": ctl.value})
    ctl.update(metrics["sampled_kl/sampled_kl_mean"], n_steps=batch_size)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from . import checks

__all__ = ["AdaptiveKLController"]

_CONFIG_NAME = "adaptive_kl"


def _horizon(option: str, value: object) -> float | int:
    """> 0; an integer stays an integer (the usual spelling: a number of steps)."""
    v = checks.positive(option, value)
    return int(value) if isinstance(value, numbers.Integral) else v


def _number(option: str, value: object) -> float:
    """A Python real or a 0-d array of any library, as a float (NaN rejected)."""
    if isinstance(value, bool):
        raise TypeError(f"{option} must be a real number or a 0-d array, got bool {value!r}")
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise TypeError(
            f"{option} must be a real number or a 0-d array, got an array of shape {tuple(shape)}"
        )
    if not isinstance(value, numbers.Real) and shape is None:
        raise TypeError(
            f"{option} must be a real number or a 0-d array, got {type(value).__name__}"
        )
    detach = getattr(value, "detach", None)  # a torch tensor that requires grad
    if callable(detach):
        value = detach()
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{option} could not be read as a float ({type(value).__name__}): {exc}"
        ) from exc
    if math.isnan(result):
        raise ValueError(f"{option} is NaN; the controller needs a measured value")
    return result


class AdaptiveKLController:
    r"""The adaptive KL coefficient of Ziegler et al. (2019).

    Each :meth:`update` with the measured KL :math:`\mathrm{KL}` over ``n_steps`` steps sets

    .. math::

        e = \operatorname{clip}\!\left(\frac{\mathrm{KL}}{\mathrm{target}} - 1,
            -0.2,\ 0.2\right), \qquad
        \beta \leftarrow \beta \left(1 + e\,\frac{n_\text{steps}}{\text{horizon}}\right)

    so the coefficient grows when the KL is above ``target`` and shrinks when it is below, by
    at most 20 % per ``horizon`` steps. Plain Python: no arrays are kept, the state is one
    float (:attr:`value`), and the object pickles and copies.

    Parameters
    ----------
    init : float > 0, default 0.1
        The initial coefficient :math:`\beta_0`.
    target : float > 0, default 6.0
        The KL the coefficient steers towards (nats).
    horizon : float > 0, default 10000
        The number of steps over which a full ±20 % correction is applied.

    Examples
    --------
    >>> import regularizers as rg
    >>> ctl = rg.AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    >>> ctl.update(12.0, n_steps=500)  # KL twice the target: error clipped to +0.2
    0.101
    >>> ctl
    AdaptiveKLController(init=0.1, target=6.0, horizon=10000, value=0.101)
    >>> round(ctl.update(5.7, n_steps=500), 10)  # 5 % below the target: -0.05 * 500 / 10000
    0.1007475
    """

    __slots__ = ("_value", "horizon", "init", "target")
    init: float
    target: float
    horizon: float | int
    _value: float

    def __init__(
        self, init: float = 0.1, target: float = 6.0, horizon: float | int = 10000
    ) -> None:
        self.init = checks.positive("init", init)
        self.target = checks.positive("target", target)
        self.horizon = _horizon("horizon", horizon)
        self._value = self.init

    @property
    def value(self) -> float:
        """The current coefficient, a Python float."""
        return self._value

    def update(self, current_kl: Any, n_steps: float | int) -> float:
        """Move the coefficient by the measured KL over ``n_steps`` steps; the new value.

        ``current_kl`` is a Python number or a 0-d array of any library (read with
        ``float()``, which syncs a device array; a KL above the target by any amount,
        ``inf`` included, counts as +20 %). NaN is a ValueError. ``n_steps`` is >= 0.
        """
        kl = _number("current_kl", current_kl)
        steps = checks.nonnegative("n_steps", n_steps)
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        factor = 1.0 + error * steps / self.horizon
        if factor <= 0.0:
            raise ValueError(
                f"n_steps={n_steps!r} is more than 5 horizons ({self.horizon!r}): the update "
                f"would make the coefficient <= 0; update more often or raise horizon"
            )
        self._value = self._value * factor
        return self._value

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(init={self.init!r}, target={self.target!r}, "
            f"horizon={self.horizon!r}, value={self._value!r})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, AdaptiveKLController)
        return self._state() == other._state()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _state(self) -> tuple[float, float, float | int, float]:
        return (self.init, self.target, self.horizon, self._value)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "target": self.target,
            "horizon": self.horizon,
            "value": self._value,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.init, self.target = state["init"], state["target"]
        self.horizon, self._value = state["horizon"], state["value"]

    def to_config(self) -> dict[str, Any]:
        """A JSON-serializable dict (options and current value); see :meth:`from_config`."""
        return {
            "controller": _CONFIG_NAME,
            "options": {"init": self.init, "target": self.target, "horizon": self.horizon},
            "value": self._value,
        }

    @classmethod
    def from_config(cls, config: Any) -> AdaptiveKLController:
        """The controller of :meth:`to_config`'s dict, at the value it had."""
        if not isinstance(config, Mapping) or config.get("controller") != _CONFIG_NAME:
            raise ValueError(
                f"an AdaptiveKLController config is a dict with controller={_CONFIG_NAME!r}, "
                f"got {config!r}"
            )
        ctl = cls(**config.get("options", {}))
        if "value" in config:
            ctl._value = checks.positive("value", config["value"])
        return ctl
