"""The backend harness of the spec suite.

Every property takes a ``bk`` argument: one backend configuration (a :class:`Backend`), with
its namespace ``bk.xp`` and the few things a test needs to do that the array API does not
say how to do (convert to and from NumPy, differentiate, run under ``jax.jit``).

Which configurations run is chosen with ``--backend NAME`` (repeatable) or the environment
variable ``REGULARIZERS_BACKENDS=numpy,torch``; by default all of them. A selected backend
that cannot be imported is an error, never a skip: a run that says it covered torch did.

``REGULARIZERS_TORCH_DEVICE=cuda`` puts the torch configuration's arrays on that device (the
suite on a GPU: the same properties, and the kernels' device branches); by default the CPU.

``bk.call(fn, *arrays)`` is how tests call the library:

- JAX (``jax_jit``): ``fn`` runs under ``jax.jit`` (the arrays are traced arguments);
- Dask: any attempt to compute inside ``fn`` raises, so results must stay lazy;
- array-api-strict (``array_api_strictest``): ``fn`` runs with the strictest flags
  (standard 2023.12, no boolean indexing, no data-dependent shapes, no extensions).
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
# A session may cap the examples of every property (JAX compiles each drawn shape, eagerly
# and again under jit, so its sessions draw fewer examples of the same properties).
if _cap := os.environ.get("REGULARIZERS_MAX_EXAMPLES"):
    settings.register_profile(
        "capped",
        parent=settings.get_profile(settings.get_current_profile_name()),
        max_examples=min(int(_cap), settings().max_examples),
    )
    settings.load_profile("capped")

# Where the torch configuration's arrays live (None: torch's default, the CPU).
TORCH_DEVICE = os.environ.get("REGULARIZERS_TORCH_DEVICE") or None


class Backend(enum.Enum):
    """One backend configuration of the spec suite."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    ARRAY_API_STRICTEST = "array_api_strictest"
    TORCH = "torch"
    JAX = "jax"
    JAX_JIT = "jax_jit"
    DASK = "dask"

    @property
    def library(self) -> str:
        return {
            "numpy": "numpy",
            "array_api_strict": "array_api_strict",
            "array_api_strictest": "array_api_strict",
            "torch": "torch",
            "jax": "jax",
            "jax_jit": "jax",
            "dask": "dask",
        }[self.value]

    @property
    def has_autodiff(self) -> bool:
        return self.library in ("torch", "jax")


# The backends a nox session names; jax also runs its jitted twin.
_ALIASES = {"jax": ["jax", "jax_jit"]}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        help="backend configuration to run (repeatable): "
        + ", ".join(b.value for b in Backend)
        + "; 'jax' selects jax and jax_jit",
    )
    parser.addoption(
        "--docs",
        action="store_true",
        help="also run test_docs.py (every code block of README.md and docs/)",
    )
    parser.addoption(
        "--tinker",
        action="store_true",
        help="also run test_tinker.py, against the installed tinker SDK",
    )
    parser.addoption(
        "--keras",
        action="store_true",
        help="also run test_keras_agreement.py, against the installed keras",
    )
    parser.addoption(
        "--distributed",
        action="store_true",
        help="also run spec_tests/distributed/ (a Dask LocalCluster, JAX on 8 CPU devices, "
        "torch.distributed with gloo: processes on 127.0.0.1)",
    )


# test module -> the flag (and the library) it needs; collected only when the flag is given
_GATED = {"test_tinker.py": "tinker", "test_keras_agreement.py": "keras", "test_docs.py": "docs"}


def pytest_ignore_collect(collection_path: Any, config: pytest.Config) -> bool | None:
    """test_tinker.py runs in the tinker session only (``--tinker``), where the SDK is, and
    test_keras_agreement.py in the keras session only (``--keras``), and test_docs.py in the
    docs session only (``--docs``), where every backend is; spec_tests/distributed/ in the
    distributed session only (``--distributed``), as it starts clusters and processes."""
    flag = _GATED.get(collection_path.name)
    if flag is not None and not config.getoption(f"--{flag}"):
        return True
    if (
        collection_path.name == "distributed"
        and collection_path.parent.name == "spec_tests"
        and not config.getoption("--distributed")
    ):
        return True
    return None


def selected_backends(config: pytest.Config) -> list[Backend]:
    names: list[str] = list(config.getoption("--backend"))
    if not names and os.environ.get("REGULARIZERS_BACKENDS"):
        names = os.environ["REGULARIZERS_BACKENDS"].split(",")
    if not names:
        return list(Backend)
    out: list[Backend] = []
    for name in names:
        for n in _ALIASES.get(name.strip(), [name.strip()]):
            try:
                b = Backend(n)
            except ValueError:
                raise pytest.UsageError(f"unknown backend {n!r}") from None
            if b not in out:
                out.append(b)
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run only on these backends")
    config.addinivalue_line(
        "markers", "cuda: runs only with REGULARIZERS_TORCH_DEVICE=cuda (test_cuda.py)"
    )
    if config.getoption("--keras"):  # keras picks its backend at import (tensorflow: not here)
        os.environ.setdefault("KERAS_BACKEND", "torch")
    for flag in _GATED.values():
        if flag != "docs" and config.getoption(f"--{flag}"):
            try:
                importlib.import_module(flag)
            except ImportError as exc:  # asked for means tested: never a silent skip
                raise pytest.UsageError(f"--{flag} was given but {exc}") from exc
    for b in selected_backends(config):
        try:
            importlib.import_module(b.library)
        except ImportError as exc:  # selected means tested: never a silent skip
            raise pytest.UsageError(f"backend {b.value} was selected but {exc}") from exc
        if b.library == "jax":  # before any JAX array exists, or float64 becomes float32
            import jax

            jax.config.update("jax_enable_x64", True)


def pytest_report_header(config: pytest.Config) -> str:
    names = [b.value for b in selected_backends(config)]
    if TORCH_DEVICE is not None:
        names = [f"{n} (on {TORCH_DEVICE})" if n == "torch" else n for n in names]
    return "regularizers backends: " + ", ".join(names)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bk" in metafunc.fixturenames:
        backends = selected_backends(metafunc.config)
        only = metafunc.definition.get_closest_marker("backends")
        if only is not None:
            backends = [b for b in backends if b.library in only.args or b.value in only.args]
        metafunc.parametrize("bk", [Harness(b) for b in backends], ids=[b.value for b in backends])


class Harness:
    """What a property needs from one backend configuration."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._xp: Any = None

    def __repr__(self) -> str:
        return self.backend.value

    @property
    def name(self) -> str:
        return self.backend.value

    @property
    def library(self) -> str:
        return self.backend.library

    @property
    def jit(self) -> bool:
        return self.backend is Backend.JAX_JIT

    @property
    def xp(self) -> Any:
        if self._xp is None:
            self._xp = _namespace(self.backend)
        return self._xp

    # ---- conversion ---------------------------------------------------------------------
    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A NumPy array (or list of them) as arrays of this backend."""
        if isinstance(a, list):
            return [self.asarray(x, dtype) for x in a]
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.library == "torch":
            import torch

            return torch.asarray(a.copy(), device=TORCH_DEVICE)
        if self.library == "dask":
            import dask.array as da

            return da.from_array(a, chunks=max(1, (a.size + 1) // 2) if a.ndim == 1 else "auto")
        if self.backend is Backend.ARRAY_API_STRICTEST:
            with self.flags():
                return self.xp.asarray(a)
        return self.xp.asarray(a)

    def dtype(self, name: str) -> Any:
        if self.library == "dask":  # Dask arrays carry NumPy dtypes (the compat namespace
            return np.dtype(name)  # lists no float16)
        return getattr(self.xp, name)

    def to_numpy(self, a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return [self.to_numpy(x) for x in a]
        if self.library == "torch":
            import torch

            a = a.detach().cpu()
            return (a.float() if a.dtype == torch.bfloat16 else a).numpy()  # NumPy has no bf16
        if self.library == "dask":
            return np.asarray(a.compute())
        if self.library == "array_api_strict":
            return np.from_dlpack(a)
        return np.asarray(a)

    def float(self, a: Any) -> float:
        return float(self.to_numpy(a))

    # ---- running the library -------------------------------------------------------------
    @contextlib.contextmanager
    def flags(self, *, forbid_compute: bool = True) -> Iterator[None]:
        """The strictest array-api-strict flags; on Dask, no computing (unless told)."""
        if self.backend is Backend.ARRAY_API_STRICTEST:
            import array_api_strict

            with array_api_strict.ArrayAPIStrictFlags(
                api_version="2023.12",
                boolean_indexing=False,
                data_dependent_shapes=False,
                enabled_extensions=(),
            ):
                yield
        elif self.library == "dask" and forbid_compute:
            import dask

            with dask.config.set(scheduler=_forbid_compute):
                yield
        else:
            yield

    def call(self, fn: Callable[..., Any], *arrays: Any) -> Any:
        """``fn(*arrays)`` the way this configuration runs it (jitted, lazy, strict)."""
        if self.jit:
            import jax

            return jax.jit(fn)(*arrays)
        with self.flags():
            return fn(*arrays)

    def autodiff(self, fn: Callable[[Any], Any], x: Any, *, generic: bool = True) -> Any:
        """The gradient of the scalar ``fn(x)`` by the backend's own autodiff.

        On torch, ``generic`` records the generic path (autograd independent of the closed
        forms); ``generic=False`` lets a built-in route autograd through its closed form, as
        users get it.
        """
        if self.library == "torch":
            import torch

            from regularizers.testing import generic_path

            leaves = [
                t.detach().clone().requires_grad_(True) for t in (x if isinstance(x, list) else [x])
            ]
            with generic_path() if generic else contextlib.nullcontext():
                value = fn(leaves if isinstance(x, list) else leaves[0])
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
            grads = [
                torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)
            ]
            return grads if isinstance(x, list) else grads[0]
        if self.library == "jax":
            import jax

            g = jax.grad(fn)
            return (jax.jit(g) if self.jit else g)(x)
        raise AssertionError(f"{self.name} has no autodiff")


def _forbid_compute(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the library computed a Dask graph; results must stay lazy")


def _namespace(backend: Backend) -> Any:
    if backend.library == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        return importlib.import_module("jax.numpy")
    if backend.library == "array_api_strict":
        return importlib.import_module("array_api_strict")
    return importlib.import_module(
        f"array_api_compat.{backend.library}" + (".array" if backend.library == "dask" else "")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) tests meant for backends this run does not select, and the CUDA
    tests where the torch configuration is not on a GPU.

    A skip would read as "this backend was not covered"; a torch-only test in the NumPy
    session is simply not part of that session.
    """
    on_cuda = str(TORCH_DEVICE).startswith("cuda")
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        wants_bk = "bk" in getattr(item, "fixturenames", ())
        params = callspec.params if callspec is not None else {}
        elsewhere = wants_bk and not isinstance(params.get("bk"), Harness)
        off_device = item.get_closest_marker("cuda") is not None and not on_cuda
        (drop if elsewhere or off_device else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report how many distinct cases the fuzzers tried in this run."""
    import sys

    fuzz = sys.modules.get(f"{__package__}.test_fuzz")
    counts = {} if fuzz is None else {k: len(v) for k, v in fuzz.FUZZED.items() if v}
    results = sys.modules.get(f"{__package__}._results")
    more = {} if results is None else dict(results.RESULTS)
    if counts or more:
        terminalreporter.write_sep("-", "fuzzing")
        for kind, n in counts.items():
            terminalreporter.write_line(f"distinct {kind} cases tried: {n}")
        for key, value in more.items():
            terminalreporter.write_line(f"{key}: {value}")
