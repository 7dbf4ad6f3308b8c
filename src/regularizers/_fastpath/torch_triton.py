"""Triton kernels for the torch closed form of KL over a class axis (``torch_distributions``).

On a GPU the torch kernels of ``KLGrad`` are a sequence of full ``[n, V]`` passes (two
``log_softmax``, ``exp``, the clamps, the products, the support-gap check): at ``[2048,
32000]`` on an H200 the training step took 1.9x the naive idiom's time, at 0.42x its memory.
Here the reverse KL ``Σ p (log p - log q)`` of each row is one pass that reads ``z`` and
``r`` once (online log-sum-exp of both, and ``Σ p (z - r)`` rescaled as the maximum moves),
and its gradient ``c · p (log p - log q - KL)`` one pass that reads them again and writes the
gradient: five ``[n, V]`` passes in all.

The conventions are the torch kernels' (hence the generic path's), element by element:

- ``p log p`` is 0 at a -inf class (``p = 0``); ``log p`` and ``log q`` are clamped to the
  dtype's lowest finite number in the gradient, as ``KLGrad`` clamps them;
- a support gap (a class not -inf in ``z``, NaN included, and -inf in ``r``) is flagged per
  row, exactly; ``KLGrad`` then makes the token's KL +inf and its gradient row 0;
- NaN, and +inf in either operand, give NaN (as ``log_softmax`` does).

The per-row KL is ``Σ p (z - r) - lse(z) + lse(r)`` (the same sum as ``Σ p (log p - log
q)``, rounded differently: values agree with the torch kernels to rounding).

:data:`TRITON` chooses: None (the default) uses these kernels for a float32 ``[n, V]`` on a
CUDA device where ``triton`` imports; True uses them on any device (the tests run them on the
CPU under Triton's interpreter, ``TRITON_INTERPRET=1``); False never. ``triton`` is imported
on first use only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["TRITON", "available", "kl_backward", "kl_forward"]

TRITON: bool | None = None
"""Whether ``KLGrad`` runs these kernels (see the module docstring)."""

_KERNELS: Any = None  # (forward, backward) once built; False: triton is missing or failed


def _kernels() -> Any:
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _build()
        except ImportError:
            _KERNELS = False
    return _KERNELS


def _launch(index: int, rows: int, *args: Any, **meta: Any) -> bool:
    """Run kernel ``index`` (0: forward, 1: backward) over ``rows`` programs; False where it
    cannot be compiled for this device (a GPU older than Triton supports, a broken install):
    then, said once in a warning, the torch kernels serve every later call."""
    global _KERNELS
    kernels = _kernels()
    if not kernels:
        return False
    try:
        kernels[index][(rows,)](*args, **meta)
    except Exception as exc:  # (compilation: Triton raises several types, driver errors too)
        _KERNELS = False
        warnings.warn(
            f"regularizers: KL's Triton kernels cannot run here ({type(exc).__name__}: "
            f"{exc}); KL uses its torch kernels from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def available(v: Any, r: Any) -> bool:
    """Whether the kernels serve the rows ``v`` and the reference ``r`` (both ``[n, V]``)."""
    if TRITON is False:
        return False
    if v.dtype != torch.float32 or r.dtype != torch.float32 or v.stride(-1) != 1:
        return False
    if r.stride(-1) != 1 or v.device != r.device:
        return False
    if TRITON is None and v.device.type != "cuda":
        return False
    return bool(_kernels())


def _block(size: int) -> int:
    return min(4096, max(16, 1 << (size - 1).bit_length()))


def kl_forward(v: Any, r: Any, t: float) -> tuple[Any, Any, Any] | None:
    """``(kl, lse, gap)`` of the rows of ``v`` against ``r`` at temperature ``t``: the reverse
    KL per row ``[n]``, ``lse(z/t)`` and ``lse(r/t)`` as ``[n, 2]``, and the support gaps
    ``[n]`` (bool); None where the kernel cannot run (see :func:`_launch`)."""
    n, size = v.shape
    kl = torch.empty(n, dtype=torch.float32, device=v.device)
    lse = torch.empty((n, 2), dtype=torch.float32, device=v.device)
    gap = torch.empty(n, dtype=torch.int8, device=v.device)
    block = _block(size)
    if not _launch(
        0, n, v, r, kl, lse, gap, size, v.stride(0), r.stride(0), float(t),
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    ):  # fmt: skip
        return None
    return kl, lse, gap.bool()


def kl_backward(v: Any, r: Any, t: float, lse: Any, kl: Any, c: Any, out: Any) -> Any:
    """``out = c · p (log p - log q - kl)`` row by row, ``c`` ``[n]`` (with ``1/t``, the
    incoming gradient and 0 at gap rows), ``kl`` ``[n]`` (0 at gap rows), ``lse`` from
    :func:`kl_forward`; ``log p`` and ``log q`` clamped to float32's lowest finite number.
    None where the kernel cannot run."""
    n, size = v.shape
    block = _block(size)
    if not _launch(
        1, n, v, r, out, lse, kl, c, size, v.stride(0), r.stride(0), out.stride(0), float(t),
        -float(torch.finfo(torch.float32).max),
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    ):  # fmt: skip
        return None
    return out


def _build() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def forward(z_ptr, r_ptr, kl_ptr, lse_ptr, gap_ptr, size, sz, sr, t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m_z = float("-inf")
        m_r = float("-inf")
        s_z = 0.0
        s_r = 0.0
        acc = 0.0
        gap = 0
        for start in range(0, size, BLOCK):
            offs = start + cols
            valid = offs < size
            x = tl.load(z_ptr + row * sz + offs, mask=valid, other=float("-inf")) / t
            y = tl.load(r_ptr + row * sr + offs, mask=valid, other=float("-inf")) / t
            x_out = x == float("-inf")  # (p = 0: no term, whatever r holds there)
            new_z = tl.maximum(m_z, tl.max(x, 0))
            alpha = tl.where(new_z == float("-inf"), 1.0, tl.exp(m_z - new_z))
            e = tl.where(x_out, 0.0, tl.exp(x - new_z))
            s_z = s_z * alpha + tl.sum(e, 0)
            acc = acc * alpha + tl.sum(tl.where(x_out, 0.0, e * (x - y)), 0)
            m_z = new_z
            new_r = tl.maximum(m_r, tl.max(y, 0))
            beta = tl.where(new_r == float("-inf"), 1.0, tl.exp(m_r - new_r))
            f = tl.where(y == float("-inf"), 0.0, tl.exp(y - new_r))
            s_r = s_r * beta + tl.sum(f, 0)
            m_r = new_r
            hit = (x != float("-inf")) & (y == float("-inf")) & valid
            gap = gap | tl.max(hit.to(tl.int32), 0)
        lse_z = m_z + tl.log(s_z)
        lse_r = m_r + tl.log(s_r)
        tl.store(kl_ptr + row, acc / s_z - lse_z + lse_r)
        tl.store(lse_ptr + 2 * row, lse_z)
        tl.store(lse_ptr + 2 * row + 1, lse_r)
        tl.store(gap_ptr + row, gap)  # (int8: stored as the pointer's type)

    @triton.jit
    def backward(
        z_ptr, r_ptr, g_ptr, lse_ptr, kl_ptr, c_ptr, size, sz, sr, sg, t, low, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        lse_z = tl.load(lse_ptr + 2 * row)
        lse_r = tl.load(lse_ptr + 2 * row + 1)
        k = tl.load(kl_ptr + row)
        c = tl.load(c_ptr + row)
        for start in range(0, size, BLOCK):
            offs = start + cols
            valid = offs < size
            x = tl.load(z_ptr + row * sz + offs, mask=valid, other=0.0) / t
            y = tl.load(r_ptr + row * sr + offs, mask=valid, other=0.0) / t
            lp = x - lse_z
            p = tl.exp(lp)
            lp = tl.where(lp < low, low, lp)  # (NaN stays NaN)
            lq = y - lse_r
            lq = tl.where(lq < low, low, lq)
            g = (lp - lq - k) * p * c
            tl.store(g_ptr + row * sg + offs, g, mask=valid)

    return forward, backward
