"""SPEC 11, PyTorch: two ranks of torch.distributed (gloo, CPU, 127.0.0.1), each computing its
share of the batch with the all-reduced ``counts``; after the gradient all-reduce every rank
holds the single-process gradient (``_torch_ddp.py`` is one rank)."""

from __future__ import annotations

import pytest

from ._cases import MODES
from .conftest import free_port, run_scripts

WORLD = 2
EXPECTED = {
    "regularizers": [f"ok regularizers {mode}" for mode in MODES],
    "pipeline": [f"ok pipeline {mode}" for mode in MODES] + [f"ok ddp {mode}" for mode in MODES],
}


@pytest.mark.parametrize("part", sorted(EXPECTED))
def test_torch_distributed_gloo(part: str) -> None:
    port = free_port()
    outs = run_scripts(
        [["_torch_ddp.py", str(rank), str(WORLD), str(port), part] for rank in range(WORLD)],
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    lines = outs[0].splitlines()
    missing = [line for line in EXPECTED[part] if line not in lines]
    assert not missing, f"checks that did not report ok: {missing}\n{outs[0]}"
    for out in outs:  # every rank finished every check
        assert f"passed {len(EXPECTED[part])}" in out.splitlines(), out
