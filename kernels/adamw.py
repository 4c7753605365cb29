"""Fused AdamW update of one chunk of packed parameter segments, in Triton.

The update (Loshchilov & Hutter, arXiv 1711.05101, Alg. 2; scalars as in torch.optim.AdamW):

    theta <- theta * decay                       decay     = 1 - lr * wd
    m     <- lerp(m, g, 1 - beta1)
    v     <- v * beta2 + (1 - beta2) * g * g
    theta <- theta - step_size * m / (sqrt(v) / bc2_sqrt + eps)
                                                 step_size = lr / (1 - beta1^t)
                                                 bc2_sqrt  = sqrt(1 - beta2^t)

One launch updates a whole chunk (see peftlab/optim/layout.py), or every resident 32-bit chunk
at once (state offsets then relative to the first chunk's views): every program takes one BLOCK of
one segment, reads parameter, gradient and both states once, and writes parameter and states
once (7 memory accesses per element, the minimum). Parameters and gradients of a chunk live at
unrelated addresses, so the kernel gets one base tensor of each and per-segment element offsets
from it (int64, in units of ALIGN elements so the compiler can prove 16-byte alignment and
vectorize); a segment's scalars come from a float32 table, one row per segment:

    hyper[s] = (decay, 1 - beta1, beta2, 1 - beta2, step_size, bc2_sqrt, eps, active)

`active` = 0 skips a segment whose parameter has no gradient this step.

The 8-bit kernel (Dettmers et al. 2021, arXiv 2110.02861) takes one 256-element quantization
block per program: it dequantizes m and v (code[q] * absmax), applies the same float32 update,
takes the block's new absmax and re-quantizes each value to the nearest entry of the dynamic map
by an 8-step binary search over the 255 midpoints between sorted codes.

bf16 parameters are rounded to nearest-even explicitly (the interpreter's cast truncates).
Reference twin: peftlab/optim/adamw_reference.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK32 = 2048        # elements per program, 32-bit states
WARPS32 = 8
QBLOCK = 256          # elements per program (one absmax block), 8-bit states
WARPS8 = 2
HYPER_COLS = 8


@triton.jit
def _to_param_dtype(x, out_ptr, RTNE_BF16: tl.constexpr):
    """Cast float32 x to the element type of out_ptr (bf16: explicit round-to-nearest-even)."""
    if RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _adamw_math(p, g, m, v, h):
    """One AdamW step on float32 values; h points at the segment's hyper row."""
    decay = tl.load(h)
    w1 = tl.load(h + 1)
    beta2 = tl.load(h + 2)
    w2 = tl.load(h + 3)
    step_size = tl.load(h + 4)
    bc2_sqrt = tl.load(h + 5)
    eps = tl.load(h + 6)
    p = p * decay
    d = g - m
    if w1 < 0.5:                       # torch.lerp's two formulas
        m = m + w1 * d
    else:
        m = g - d * (1.0 - w1)
    v = v * beta2 + (w2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps   # IEEE-rounded, as torch computes them
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _adamw32_block(pp, gp, mp, vp, h, mask, MASKED: tl.constexpr, RTNE_BF16: tl.constexpr):
    if MASKED:
        p = tl.load(pp, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gp, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(mp, mask=mask, other=0.0)
        v = tl.load(vp, mask=mask, other=0.0)
    else:
        p = tl.load(pp).to(tl.float32)
        g = tl.load(gp).to(tl.float32)
        m = tl.load(mp)
        v = tl.load(vp)
    p, m, v = _adamw_math(p, g, m, v, h)
    p_out = _to_param_dtype(p, pp, RTNE_BF16)
    if MASKED:
        tl.store(pp, p_out, mask=mask)
        tl.store(mp, m, mask=mask)
        tl.store(vp, v, mask=mask)
    else:
        tl.store(pp, p_out)
        tl.store(mp, m)
        tl.store(vp, v)


@triton.jit
def _adamw32_kernel(p_base, g_base, m_ptr, v_ptr, blocks, segs, addrs, hyper,
                    BLOCK: tl.constexpr, ALIGN: tl.constexpr, RTNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1) * BLOCK
    moff = tl.load(segs + 3 * s) * 8
    voff = tl.load(segs + 3 * s + 1) * 8
    n = tl.load(segs + 3 * s + 2)
    poff = tl.load(addrs + 2 * s) * ALIGN
    goff = tl.load(addrs + 2 * s + 1) * ALIGN
    h = hyper + 8 * s
    idx = start + tl.arange(0, BLOCK)
    pp = p_base + poff + idx
    gp = g_base + goff + idx
    mp = m_ptr + moff + idx
    vp = v_ptr + voff + idx
    if tl.load(h + 7) != 0.0:
        if start + BLOCK <= n:
            _adamw32_block(pp, gp, mp, vp, h, idx < n, False, RTNE_BF16)
        else:
            _adamw32_block(pp, gp, mp, vp, h, idx < n, True, RTNE_BF16)


def adamw32_chunk(p_base: torch.Tensor, g_base: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  blocks: torch.Tensor, segs: torch.Tensor, addrs: torch.Tensor,
                  hyper: torch.Tensor, align: int) -> None:
    """Update every segment of one 32-bit chunk, or of several resident ones, in one launch.

    p_base, g_base: any parameter / gradient (the offsets are relative to them); m, v: float32
    state views the state offsets are relative to (one chunk's, or the first of several: the
    offsets of the others then include the distance between the buffers); blocks: int32
    [programs, 2] (segment, block in segment); segs: int64 [S, 3] (m offset / 8, v offset / 8,
    length), or [S, 2] (state offset / 8, length) for one chunk's own views; addrs: int64 [S, 2]
    (param offset / align, grad offset / align); hyper: float32 [S, 8]; align: 8 if every param and
    grad offset is a multiple of 8 elements, else 1.
    """
    if segs.shape[1] == 2:        # one chunk: m and v at the same offsets (one extra small kernel)
        segs = torch.cat([segs[:, :1], segs], 1).contiguous()
    grid = (blocks.shape[0],)
    _adamw32_kernel[grid](p_base, g_base, m, v, blocks, segs, addrs, hyper, BLOCK=BLOCK32,
                          ALIGN=align, RTNE_BF16=p_base.dtype == torch.bfloat16,
                          num_warps=WARPS32)


@triton.jit
def _search(q, s, bounds, STEP: tl.constexpr):
    """One step of a branchless binary search: q counts the bounds below s."""
    b = tl.load(bounds + q + (STEP - 1))
    return tl.where(b < s, q + STEP, q)


@triton.jit
def _requantize(x, valid, full, bounds):
    """Blockwise 8-bit quantization of one block x (peftlab.quant.blockwise8, "nearest").

    absmax = max |x|; a full block scales by the reciprocal and stores the raw absmax, a ragged
    one divides and stores max(absmax, 1e-38); the index is #(bounds < clamp(s, -1, 1)).
    """
    am = tl.max(tl.where(valid, tl.abs(x), 0.0), 0)
    # 1e-38 is below float32's normal range, so Triton 3.6 makes it a float64 operand and the
    # maximum float64; the cast brings back am exactly or float32(1e-38), as torch's clamp gives
    am_c = tl.maximum(am, 1e-38).to(tl.float32)
    s_full = x * tl.div_rn(tl.zeros_like(x) + 1.0, am_c)
    s_rag = tl.div_rn(x, am_c)
    s = tl.where(full, s_full, s_rag)
    s = tl.where(am > 0.0, s, 0.0)
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    q = tl.zeros_like(valid.to(tl.int32))
    q = _search(q, s, bounds, 128)
    q = _search(q, s, bounds, 64)
    q = _search(q, s, bounds, 32)
    q = _search(q, s, bounds, 16)
    q = _search(q, s, bounds, 8)
    q = _search(q, s, bounds, 4)
    q = _search(q, s, bounds, 2)
    q = _search(q, s, bounds, 1)
    return q.to(tl.uint8), tl.where(full, am, am_c)


@triton.jit
def _adamw8_kernel(p_base, g_base, qm_ptr, qv_ptr, am_ptr, av_ptr, code_m, code_v, bounds_m,
                   bounds_v, blocks, segs, addrs, hyper,
                   QB: tl.constexpr, ALIGN: tl.constexpr, RTNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(blocks + 2 * pid)
    j = tl.load(blocks + 2 * pid + 1)
    qblock = tl.load(segs + 2 * s) + j           # absmax index of this block in the chunk
    n = tl.load(segs + 2 * s + 1)
    poff = tl.load(addrs + 2 * s) * ALIGN
    goff = tl.load(addrs + 2 * s + 1) * ALIGN
    h = hyper + 8 * s
    if tl.load(h + 7) != 0.0:
        i = tl.arange(0, QB)
        idx = j * QB + i
        valid = idx < n
        full = j * QB + QB <= n
        p = tl.load(p_base + poff + idx, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_base + goff + idx, mask=valid, other=0.0).to(tl.float32)
        cm = tl.load(qm_ptr + qblock * QB + i, mask=valid, other=0).to(tl.int32)
        cv = tl.load(qv_ptr + qblock * QB + i, mask=valid, other=0).to(tl.int32)
        m = tl.load(code_m + cm) * tl.load(am_ptr + qblock)
        v = tl.load(code_v + cv) * tl.load(av_ptr + qblock)
        p, m, v = _adamw_math(p, g, m, v, h)
        tl.store(p_base + poff + idx, _to_param_dtype(p, p_base, RTNE_BF16), mask=valid)
        cm, am = _requantize(m, valid, full, bounds_m)
        cv, av = _requantize(v, valid, full, bounds_v)
        tl.store(qm_ptr + qblock * QB + i, cm, mask=valid)
        tl.store(qv_ptr + qblock * QB + i, cv, mask=valid)
        tl.store(am_ptr + qblock, am)
        tl.store(av_ptr + qblock, av)


def adamw8_chunk(p_base: torch.Tensor, g_base: torch.Tensor, qm: torch.Tensor, qv: torch.Tensor,
                 am: torch.Tensor, av: torch.Tensor, code_m: torch.Tensor, code_v: torch.Tensor,
                 bounds_m: torch.Tensor, bounds_v: torch.Tensor, blocks: torch.Tensor,
                 segs: torch.Tensor, addrs: torch.Tensor, hyper: torch.Tensor, align: int) -> None:
    """Update every segment of an 8-bit chunk in one launch (one program per 256-block).

    qm, qv: uint8 [256 B] codes; am, av: float32 [B] absmax; code_*: float32 [256] ascending
    dynamic maps (signed for m, unsigned for v); bounds_*: float32 [255] midpoints of the codes;
    segs: int64 [S, 2] (first 256-block, length); the rest as in `adamw32_chunk`.
    """
    grid = (blocks.shape[0],)
    _adamw8_kernel[grid](p_base, g_base, qm, qv, am, av, code_m, code_v, bounds_m, bounds_v,
                         blocks, segs, addrs, hyper, QB=QBLOCK, ALIGN=align,
                         RTNE_BF16=p_base.dtype == torch.bfloat16, num_warps=WARPS8)
