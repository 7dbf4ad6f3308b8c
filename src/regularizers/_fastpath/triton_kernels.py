"""The Triton kernels of ``torch_triton`` (imported by it on first use, where ``triton``
imports): KL's forward and backward, JSD's, Entropy's, one program per row of ``[n, V]``.

A backward with ``KEEP`` reads a byte per row (``keep_ptr``, the Batch's mask) and writes 0
over the rows it says are not counted, whatever they held (NaN, inf): the ``masked_fill``
of the row that the torch kernels do after the gradient, in the same pass."""

import triton
import triton.language as tl


@triton.jit
def _online(m, s, x):
    """One block of an online log-sum-exp: the new maximum, the sum rescaled to it plus the
    block's terms, the factor of that rescaling and the terms ``exp(x - max)`` (0 at -inf)."""
    new = tl.maximum(m, tl.max(x, 0))
    alpha = tl.where(new == float("-inf"), 1.0, tl.exp(m - new))
    e = tl.where(x == float("-inf"), 0.0, tl.exp(x - new))
    return new, s * alpha + tl.sum(e, 0), alpha, e


@triton.jit
def kl_forward(z_ptr, r_ptr, kl_ptr, lse_ptr, gap_ptr, size, sz, sr, t, BLOCK: tl.constexpr):
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
        m_z, s_z, alpha, e = _online(m_z, s_z, x)
        # (p = 0 at a -inf class: no term, whatever r holds there)
        acc = acc * alpha + tl.sum(tl.where(x == float("-inf"), 0.0, e * (x - y)), 0)
        m_r, s_r, _beta, _f = _online(m_r, s_r, y)
        hit = (x != float("-inf")) & (y == float("-inf")) & valid
        gap = gap | tl.max(hit.to(tl.int32), 0)
    lse_z = m_z + tl.log(s_z)
    lse_r = m_r + tl.log(s_r)
    tl.store(kl_ptr + row, acc / s_z - lse_z + lse_r)
    tl.store(lse_ptr + 2 * row, lse_z)
    tl.store(lse_ptr + 2 * row + 1, lse_r)
    tl.store(gap_ptr + row, gap)  # (int8: stored as the pointer's type)


@triton.jit
def kl_backward(
    z_ptr, r_ptr, g_ptr, lse_ptr, kl_ptr, c_ptr, keep_ptr, size, sz, sr, sg, t, low,
    KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse_z = tl.load(lse_ptr + 2 * row)
    lse_r = tl.load(lse_ptr + 2 * row + 1)
    k = tl.load(kl_ptr + row)
    c = tl.load(c_ptr + row)
    if KEEP:  # (the row's byte of the mask: is it counted)
        kept = tl.load(keep_ptr + row) != 0
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
        if KEEP:
            g = tl.where(kept, g, 0.0)
        tl.store(g_ptr + row * sg + offs, g, mask=valid)


@triton.jit
def _jsd_terms(x, y, lse_z, lse_r, log_b, log_1b, low):
    """``(p, log p - log m, q, log q - log m)`` of one block, as ``_jsd_rows`` has them."""
    lp = x - lse_z
    lq = y - lse_r
    a = lq + log_b  # log(β q)
    b = lp + log_1b  # log((1 - β) p)
    top = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    top = tl.where(top < low, low, top)  # (-inf where both are: no -inf - -inf)
    lm = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
    lm = tl.where(lm < low, low, lm)
    p = tl.exp(lp)
    q = tl.exp(lq)
    lp = tl.where(lp < low, low, lp)
    lq = tl.where(lq < low, low, lq)
    return p, lp - lm, q, lq - lm


@triton.jit
def _lse2(z_ptr, r_ptr, row, size, sz, sr, t, BLOCK: tl.constexpr):
    """``lse(z/t)`` and ``lse(r/t)`` of one row, online."""
    cols = tl.arange(0, BLOCK)
    m_z = float("-inf")
    m_r = float("-inf")
    s_z = 0.0
    s_r = 0.0
    for start in range(0, size, BLOCK):
        offs = start + cols
        valid = offs < size
        x = tl.load(z_ptr + row * sz + offs, mask=valid, other=float("-inf")) / t
        y = tl.load(r_ptr + row * sr + offs, mask=valid, other=float("-inf")) / t
        m_z, s_z, _alpha, _e = _online(m_z, s_z, x)
        m_r, s_r, _beta, _f = _online(m_r, s_r, y)
    return m_z + tl.log(s_z), m_r + tl.log(s_r)


@triton.jit
def jsd_forward(
    z_ptr, r_ptr, kl_ptr, lse_ptr, size, sz, sr, t, log_b, log_1b, low, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    lse_z, lse_r = _lse2(z_ptr, r_ptr, row, size, sz, sr, t, BLOCK)
    cols = tl.arange(0, BLOCK)
    kl_p = 0.0
    kl_q = 0.0
    for start in range(0, size, BLOCK):
        offs = start + cols
        valid = offs < size
        x = tl.load(z_ptr + row * sz + offs, mask=valid, other=float("-inf")) / t
        y = tl.load(r_ptr + row * sr + offs, mask=valid, other=float("-inf")) / t
        p, dp, q, dq = _jsd_terms(x, y, lse_z, lse_r, log_b, log_1b, low)
        kl_p += tl.sum(tl.where(valid, p * dp, 0.0), 0)
        kl_q += tl.sum(tl.where(valid, q * dq, 0.0), 0)
    tl.store(kl_ptr + 2 * row, kl_p)
    tl.store(kl_ptr + 2 * row + 1, kl_q)
    tl.store(lse_ptr + 2 * row, lse_z)
    tl.store(lse_ptr + 2 * row + 1, lse_r)


@triton.jit
def jsd_backward(
    z_ptr, r_ptr, g_ptr, lse_ptr, kl_ptr, c_ptr, keep_ptr, size, sz, sr, sg, t, log_b, log_1b,
    low, C_ROWS: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse_z = tl.load(lse_ptr + 2 * row)
    lse_r = tl.load(lse_ptr + 2 * row + 1)
    k = tl.load(kl_ptr + row)
    c = tl.load(c_ptr + row) if C_ROWS else tl.load(c_ptr)
    if KEEP:  # (the row's byte of the mask: is it counted)
        kept = tl.load(keep_ptr + row) != 0
    for start in range(0, size, BLOCK):
        offs = start + cols
        valid = offs < size
        x = tl.load(z_ptr + row * sz + offs, mask=valid, other=0.0) / t
        y = tl.load(r_ptr + row * sr + offs, mask=valid, other=0.0) / t
        p, dp, _q, _dq = _jsd_terms(x, y, lse_z, lse_r, log_b, log_1b, low)
        g = (dp - k) * p * c
        if KEEP:
            g = tl.where(kept, g, 0.0)
        tl.store(g_ptr + row * sg + offs, g, mask=valid)


@triton.jit
def entropy_forward(z_ptr, h_ptr, lse_ptr, size, sz, t, BLOCK: tl.constexpr):
    """``H = lse - Σ p x`` (``x = z/t``; -inf classes have no term) and ``lse``, online."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    acc = 0.0
    for start in range(0, size, BLOCK):
        offs = start + cols
        valid = offs < size
        x = tl.load(z_ptr + row * sz + offs, mask=valid, other=float("-inf")) / t
        m, s, alpha, e = _online(m, s, x)
        acc = acc * alpha + tl.sum(tl.where(x == float("-inf"), 0.0, e * x), 0)
    lse = m + tl.log(s)
    tl.store(h_ptr + row, lse - acc / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def entropy_backward(
    z_ptr, g_ptr, lse_ptr, h_ptr, c_ptr, keep_ptr, size, sz, sg, t, low,
    C_ROWS: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``c · p (log p + H)``, ``log p`` clamped to ``low`` (``EntropyGrad``'s steps)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    h = tl.load(h_ptr + row)
    c = tl.load(c_ptr + row) if C_ROWS else tl.load(c_ptr)
    if KEEP:  # (the row's byte of the mask: is it counted)
        kept = tl.load(keep_ptr + row) != 0
    for start in range(0, size, BLOCK):
        offs = start + cols
        valid = offs < size
        x = tl.load(z_ptr + row * sz + offs, mask=valid, other=0.0) / t
        lp = x - lse
        p = tl.exp(lp)
        lp = tl.where(lp < low, low, lp)
        g = (lp + h) * p * c
        if KEEP:
            g = tl.where(kept, g, 0.0)
        tl.store(g_ptr + row * sg + offs, g, mask=valid)
