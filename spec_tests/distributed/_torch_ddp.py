"""One rank of torch.distributed (gloo, CPU), run by test_torch.py:
``python _torch_ddp.py RANK WORLD PORT regularizers|pipeline``.

Every rank takes its share of the batch's sequences (datums of a list, rows of an array),
computes the local ``counts``, all-reduces them, and computes its part with them. Then:

- ``regularizers``: for every regularizer and ``reduce`` mode, on a ragged list and on rows,
  by autograd and by ``value_and_grad``: the all-reduced (summed) gradients w.r.t. the
  logprobs equal the single-process gradient, the summed values and ``*_raw``/``*_mean``
  metrics the single-process ones, the max-reduced ``*_max`` the single-process max (and a
  Pipeline's grad norms, as the root of the summed squares, the single-process norms);
- ``pipeline``: the same for a Pipeline of all of them, and a small model wrapped in
  ``DistributedDataParallel``, whose gradient all-reduce (an average over ranks, so the loss
  is scaled by the world size) gives every parameter its single-process gradient.

Prints ``ok <check>`` per check (rank 0) and ``passed <n>``; any failure raises.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _cases import MODES, close, combine, flat, pipeline, ragged, regularizers, rows, split

import regularizers as rg

RANK, WORLD, PORT = (int(a) for a in sys.argv[1:4])
PASSED: list[str] = []


def ok(name: str) -> None:
    PASSED.append(name)
    if RANK == 0:
        print("ok", name, flush=True)


def tensors(a: Any) -> Any:
    return [torch.tensor(x) for x in a] if isinstance(a, list) else torch.tensor(a)


def leaves(a: Any) -> Any:
    if isinstance(a, list):
        return [x.detach().clone().requires_grad_(True) for x in a]
    return a.detach().clone().requires_grad_(True)


def grads_of(x: Any) -> Any:
    xs = x if isinstance(x, list) else [x]
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in xs]


def batches() -> list[tuple[str, Any, Any]]:
    """(label, logprobs, mask) of the whole batch, as torch float64."""
    xs, ms = ragged()
    x2, m2 = rows()
    return [("list", tensors(xs), tensors(ms)), ("rows", tensors(x2), tensors(m2))]


def shard(a: Any) -> Any:
    return split(a, WORLD)[RANK]


def global_counts(counter: Any, data: Any, x: Any) -> dict[str, Any]:
    counts = counter.counts(data, x)
    for c in counts.values():
        dist.all_reduce(c)
    return counts


def gathered(local: Any, whole: Any) -> np.ndarray:
    """The summed gradients of all ranks, each placed at its sequences in the whole batch:
    what a data-parallel gradient all-reduce adds up."""
    if isinstance(whole, list):
        parts = split(list(range(len(whole))), WORLD)
        full = [torch.zeros_like(t) for t in whole]
        for i, g in zip(parts[RANK], local, strict=True):
            full[i] = g.detach().clone()
        buffer = torch.cat([t.reshape(-1) for t in full])
    else:
        bounds = split(list(range(whole.shape[0])), WORLD)[RANK]
        full_t = torch.zeros_like(whole)
        if bounds:
            full_t[bounds[0] : bounds[-1] + 1] = local[0].detach()
        buffer = full_t.reshape(-1)
    dist.all_reduce(buffer)
    return buffer.numpy()


def combined(metrics: dict[str, Any]) -> dict[str, float]:
    """The parts' metrics made whole (see ``_cases.combine``)."""
    out = {}
    for k, v in metrics.items():
        how = combine(k)
        if how is None:
            continue
        t = v.detach().clone()
        if how == "norm":
            t = t * t
        dist.all_reduce(t, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
        out[k] = float(t.sqrt() if how == "norm" else t)
    return out


def check_part(what: str, obj: Any, counter: Any, x: Any, m: Any) -> None:
    """``obj`` (a regularizer or a Pipeline) on this rank's share, by autograd and by
    ``value_and_grad``, against the single-process result."""
    whole = leaves(x)
    want_v, want_m = (
        obj(whole, data={"mask": m})
        if not isinstance(obj, rg.Pipeline)
        else obj({"mask": m}, whole)
    )
    want_v.backward()
    want_g = flat(grads_of(whole))
    _, _, closed = obj.value_and_grad({"mask": m}, x)
    close(flat(closed), want_g, f"{what}: single-process value_and_grad vs autograd")

    lx, lm = shard(x), shard(m)
    data = {"mask": lm}
    counts = global_counts(counter, data, lx)
    assert {k: int(v) for k, v in counts.items()} == {
        k: int(v) for k, v in counter.counts({"mask": m}, x).items()
    }, what
    part = leaves(lx)
    if isinstance(obj, rg.Pipeline):
        value, metrics = obj(data, part, counts=counts)
    else:
        value, metrics = obj.compute(data, part, counts=counts)
    value.backward()
    total = value.detach().clone()
    dist.all_reduce(total)
    close(float(total), float(want_v), f"{what}: summed values")
    got_m = combined(metrics)
    assert got_m, what
    for k, v in got_m.items():
        close(v, float(want_m[k]), f"{what}: {k}")
    close(gathered(grads_of(part), x), want_g, f"{what}: all-reduced autograd gradient")

    _, _, g = obj.value_and_grad(data, lx, counts=counts)
    g = g if isinstance(g, list) else [g]
    close(gathered(g, x), want_g, f"{what}: all-reduced value_and_grad gradient")


def check_regularizers() -> None:
    for mode in MODES:
        for label, x, m in batches():
            for reg in regularizers(mode):
                check_part(f"{mode} {label} {reg!r}", reg, reg, x, m)
        ok(f"regularizers {mode}")


class TinyLM(torch.nn.Module):
    """Per-token logprobs of the next token, one tensor per datum (as Tinker hands them)."""

    def __init__(self, vocab: int = 13, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width, dtype=torch.float64)
        self.out = torch.nn.Linear(width, vocab, dtype=torch.float64)

    def forward(self, tokens: list[torch.Tensor], targets: list[torch.Tensor]) -> Any:
        out = []
        for tok, tgt in zip(tokens, targets, strict=True):
            logp = torch.log_softmax(self.out(torch.tanh(self.embed(tok))), dim=-1)
            out.append(logp.gather(-1, tgt[:, None])[:, 0])
        return out


def check_pipeline() -> None:
    for mode in MODES:
        pipe = pipeline(mode)
        counter = pipe.terms[0].regularizer
        for label, x, m in batches():
            check_part(f"{mode} {label} Pipeline", pipe, counter, x, m)
        ok(f"pipeline {mode}")

    from torch.nn.parallel import DistributedDataParallel

    rng = np.random.default_rng(3)
    _, masks = ragged()
    lengths = [len(mk) for mk in masks]
    tokens = [torch.tensor(rng.integers(0, 13, size=n)) for n in lengths]
    targets = [torch.tensor(rng.integers(0, 13, size=n)) for n in lengths]
    masks_t = tensors(masks)
    torch.manual_seed(0)
    model = TinyLM()
    for mode in MODES:
        pipe = pipeline(mode)
        reference = copy.deepcopy(model)
        loss, _ = pipe({"mask": masks_t}, reference(tokens, targets))
        loss.backward()

        ddp = DistributedDataParallel(copy.deepcopy(model))
        data = {"mask": shard(masks_t)}
        logprobs = ddp(shard(tokens), shard(targets))
        counts = global_counts(pipe.terms[0].regularizer, data, logprobs)
        part, _ = pipe(data, logprobs, counts=counts)
        (part * WORLD).backward()  # DDP averages the ranks' gradients; the parts add up
        for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters(), strict=True):
            close(p.grad.numpy(), q.grad.numpy(), f"DDP {mode}: d loss / d {name}")
        ok(f"ddp {mode}")


if __name__ == "__main__":
    torch.manual_seed(0)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{PORT}",
        rank=RANK,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        {"regularizers": check_regularizers, "pipeline": check_pipeline}[sys.argv[4]]()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print("passed", len(PASSED), flush=True)
    # Every check has passed and been reported: leave without running C++ static destructors,
    # where gloo's threads can race interpreter shutdown and abort ("terminate called without
    # an active exception", exit -6, seen once in ~5 runs after "passed" was printed).
    os._exit(0)
