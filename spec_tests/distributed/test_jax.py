"""SPEC 11, JAX: sharded inputs under ``jit`` and eagerly, and ``counts`` + ``psum`` under
``shard_map``, on 8 CPU devices; and (SPEC 4) fields of ``data`` on other devices than the
logprobs, brought to theirs. XLA reads ``--xla_force_host_platform_device_count`` when jax
is first imported, so the checks run in a fresh interpreter (``_jax_sharded.py``)."""

from __future__ import annotations

import pytest

from ._cases import MODES, OPTIONS, UNSPLIT_OPTIONS
from .conftest import run_scripts

ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
MESHES = (
    "explicit rows",
    "explicit tokens",
    "explicit rows x tokens",
    "auto rows",
)
# shard_map: every regularizer (each option set) of every reduce mode, and a Pipeline
SPLIT = sum(len(v) for v in OPTIONS.values())
# eager: every regularizer (each option set, unsplit) of every reduce mode, and a Pipeline
EAGER = (SPLIT + sum(len(v) for v in UNSPLIT_OPTIONS.values()) + 1) * len(MODES)
EXPECTED = {
    "jit": len(MESHES),
    "shard_map": SPLIT * len(MODES) + 1,
    "eager": EAGER,
    "devices": 2 * 6,
}


@pytest.mark.parametrize("part", sorted(EXPECTED))
def test_jax_on_8_devices(part: str) -> None:
    (out,) = run_scripts([["_jax_sharded.py", part]], env=ENV, timeout=400)
    lines = out.splitlines()
    oks = [line for line in lines if line.startswith(f"ok {part} ")]
    if part == "jit":
        assert oks == [f"ok jit {mesh}" for mesh in MESHES], out
    elif part in ("eager", "devices"):  # (devices: one array and a list, 6 readers each)
        assert len(oks) == EXPECTED[part], out
    else:
        assert len(oks) == EXPECTED[part], out
        for mode in MODES[1:]:  # "sum" is the default, which repr leaves out
            assert sum(f"reduce={mode!r}" in line for line in oks) == SPLIT, (mode, out)
        assert "ok shard_map Pipeline" in oks, out
    assert f"passed {EXPECTED[part]}" in lines, out
