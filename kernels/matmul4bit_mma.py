"""Small-M fused 4-bit matmul with hand-placed tensor-core fragments (``mma.sync``), issue 6.

QLoRA's frozen layer (Dettmers et al. 2023, arXiv 2305.14314, section 3, eq. 5) at decode time,
M = 1..16 rows of x:

    y[m, n] = sum_b absmax[n, b] * sum_{k in block b} x[m, k] * code[q[n, k]]    (+ bias[n])

is a matrix-vector product bound by reading the weight: 0.5 byte per weight plus its absmax,
against bf16 ``F.linear``'s 2 bytes, so the ceiling is about 3.9x bf16. The ``tl.dot`` kernel of
``matmul4bit_kernels.py`` decodes a [BN, BK] tile and lets Triton move it into the MMA operand
layout (shared memory and shuffles), which costs more issue slots than the memory system leaves.
Here every lane decodes exactly the weights that ``mma.sync.m16n8k16`` wants in its registers,
so nothing moves between lanes.

Fragments (PTX ISA, ``mma.m16n8k16`` with 16-bit A/B, f32 C), lane = 4 g + t, g = 0..7, t = 0..3:

    A [16 x 16]  a0 = A[g, 2t:2t+2]   a1 = A[g+8, 2t:2t+2]   a2 = A[g, 2t+8:2t+10]   a3 = A[g+8, ..]
    B [16 x 8]   b0 = B[2t:2t+2, g]   b1 = B[2t+8:2t+10, g]
    C [16 x 8]   c0, c1 = C[g, 2t], C[g, 2t+1]         c2, c3 = C[g+8, 2t], C[g+8, 2t+1]

A's rows are 16 rows of W, B's columns are up to 8 rows of x (a second column group of MMAs
for M = 9..16), C = W x^T. A sum over k does not care which k sits in which of the 16 slots, as
long as A and B agree. Per K step of 64 (one quantization block when B >= 64), lane (g, t) loads
the two int32 words of rows g and g+8 at k0 + 16t .. k0 + 16t + 15 (8 bytes each; a row's 4
lanes read its 32 contiguous bytes), decodes each word into four bf16/fp16 pairs in memory order
(``decode4bit.decode_pairs``: 21 instructions per 8 weights), and MMA j (j = 0..3) takes the
codes k0 + 16t + 4j .. + 3:

    slot 2t, 2t+1  <->  k0 + 16t + 4j + 0, 1         slot 2t+8, 2t+9  <->  k0 + 16t + 4j + 2, 3

with B from x[m, the same k] (the lane loads its 32 contiguous bytes of x row m = g, or 8 + g).
The four MMAs start from zero, so afterwards C holds the block's unscaled row sums, and
``acc += C * absmax[row, block]`` (four float32 FMAs per lane; the absmax, double-quantized or
not, decoded per row). Products and sums are float32 in the tensor core, more precise than the
reference (dequantize to bf16, then ``F.linear``).

Work split: the WARPS warps of a program share its 16 rows; warp w takes K steps w, w + WARPS,
..., so a program reads WARPS x 32 contiguous bytes of each row at a time, and the warps' C are
summed at the end. Each warp issues the loads of its next UNROLL steps (words, x, absmax) before
decoding the current ones (registers as the pipeline). Split-K over programs as in
``matmul4bit_kernels._epilogue`` (workspace, counters, the last program reduces in a fixed
order). Lanes find their role from ``%tid.x`` (inline PTX), and every tensor in the loop has one
element per thread, so the lane that loads is the lane that multiplies.

Decoders: PRMT (the default) or, with ``LUT``, a 32 KB shared-memory table of the 256 byte values
-> their code pair (32 copies, lane l reads copy l, so lookups never share a bank; per byte a
prmt, an address and an LDS: 8 ALU instructions per word, against 19 of the PRMT decoder's
21). Both give identical results; on the H200 the table was slower on every shape (it costs
occupancy and a fill per program), so it is a pinnable option only.

Measured (H200, ``results/h200_kernels.md``): 1.40-1.59x bf16 ``F.linear`` at M = 1 and
1.06-1.29x at M = 16 on Llama shapes (the ``tl.dot`` kernel: 0.8-0.95x); Nsight Compute shows
neither DRAM (28 % of peak) nor the ALU saturated, with 3.6 warps per scheduler.
With decode and MMA cut out (``experiments/mma_ablate.py``) the weight loads alone reach only
2.6-2.9 TB/s on 28672x8192; staging the weight tile through shared memory with whole-line loads
did not lift that. Nor did loads that hold no registers (session 18: a per-lane ``cp.async``
ring of 2-16 steps was slower, the deeper the slower) or whole-line 16-byte loads from a
repacked weight layout (0-8 % where its timing was clean); the code of both is in git history
(commit 8f68793), the numbers in ``results/h200_kernels.md``.

Needs CUDA, x bf16/fp16 with 16-byte aligned rows, K % 64 == 0, blocksize % 64 == 0 (a K step
inside one block) and a power-of-two nested blocksize; ``matmul4bit.py`` falls back to the
``tl.dot`` kernel otherwise. The host side (eligibility ``_mma_unfit``, split-K sizing
``_mma_splits``, the tuner's (tile, split-K) candidates ``_mma_candidates`` timed on rotated
weight copies ``_cold_copies``, and the launch ``_mma``) is at the end of this file; shared
helpers in ``matmul4bit_common.py``.
"""
from __future__ import annotations

import copy
import itertools
import os
import weakref
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from peftlab.errors import QuantError

from . import tuning
from .decode4bit import decode_pairs, prmt_decoder_ok
from .matmul4bit_common import (MAX_SPLIT, _cache_put, _cdiv, _counters, _interpreting,
                                _m_bucket, _num_sms, _tables, _workspace)
from .matmul4bit_kernels import _epilogue
from .tuning import fastest

STEP = tl.constexpr(64)    # K per step: 4 lanes x 16 codes


def _mma_ptx(ab: str) -> str:
    """Four chained m16n8k16 MMAs from zero: $0..$3 = C; A fragments $4..$19 (a0..a3 of MMA 0,
    then 1, 2, 3), B fragments $20..$27 (b0, b1 of MMA 0..3)."""
    op = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    lines = ["{", ".reg .f32 z, d0, d1, d2, d3;", "mov.f32 z, 0f00000000;"]
    for j in range(4):
        a = ", ".join(f"${4 + 4 * j + i}" for i in range(4))
        c = "z, z, z, z" if j == 0 else "d0, d1, d2, d3"
        b = f"${20 + 2 * j}, ${21 + 2 * j}"
        lines.append(f"{op} {{d0, d1, d2, d3}}, {{{a}}}, {{{b}}}, {{{c}}};")
    lines += ["mov.f32 $0, d0;", "mov.f32 $1, d1;", "mov.f32 $2, d2;", "mov.f32 $3, d3;", "}"]
    return "\n".join(lines)


_MMA_BF16 = tl.constexpr(_mma_ptx("bf16"))
_MMA_F16 = tl.constexpr(_mma_ptx("f16"))
_MMA_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f," + ",".join(["r"] * 24))


@triton.jit
def _thread_ids(THREADS: tl.constexpr):
    """[THREADS] int32: the id (%tid.x) of the thread holding each element."""
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [tl.arange(0, THREADS)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _ld2(ptr):
    """Two int32 at ``ptr`` (8-byte aligned) in one 8-byte load, read-only path."""
    return tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                     [ptr.to(tl.int64)], dtype=(tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def _ld4(ptr):
    """Four int32 at ``ptr`` (16-byte aligned) in one 16-byte load."""
    return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
                                     "=r,=r,=r,=r,l", [ptr.to(tl.int64)],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


# A shared-memory table of the 256 byte values -> their two codes as a 16-bit pair (e0 = the high
# nibble in the low half), 32 copies so that lane l reads copy l: word e*32 + l sits in bank l,
# so a warp's 32 lookups never conflict. 32 KB, declared in PTX (static shared memory).
_LUT_DECL = tl.constexpr("{\n.shared .align 16 .b32 peftlab_pairs[8192];\n"
                         "mov.u32 $0, peftlab_pairs;\n}")
_LUT_PAIRS = tl.constexpr(
    "{\n.reg .b32 b, a;\n" + "".join(
        f"prmt.b32 b, $4, 0, 0x444{j};\nmad.lo.u32 a, b, 128, $5;\nld.shared.b32 ${j}, [a];\n"
        for j in range(4)) + "}")


@triton.jit
def _lut_base(tid):
    """Shared-memory address (32-bit) of the pair table, per element of ``tid``."""
    return tl.inline_asm_elementwise(_LUT_DECL, "=r,r", [tid], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _st_shared(addr, val):
    """st.shared of ``val`` at 32-bit shared address ``addr`` (returns a dummy 0)."""
    return tl.inline_asm_elementwise("st.shared.b32 [$1], $2;\nmov.u32 $0, 0;", "=r,r,r",
                                     [addr, val], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _lut_pairs(wd, lane_base):
    """int32 words -> their four 16-bit code pairs, looked up byte by byte in the shared table
    (``lane_base``: table address + 4 * lane): per byte a prmt, an address and an LDS."""
    return tl.inline_asm_elementwise(_LUT_PAIRS, "=r,=r,=r,=r,r,r", [wd, lane_base],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def _mma4(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7,
          x0, x1, x2, x3, x4, x5, x6, x7, IS_BF16: tl.constexpr):
    """C of one step: rows g (pairs g0..g7 = two words) and g + 8 (h0..h7) against x pairs."""
    args = [g0, h0, g1, h1, g2, h2, g3, h3, g4, h4, g5, h5, g6, h6, g7, h7,
            x0, x1, x2, x3, x4, x5, x6, x7]
    if IS_BF16:
        return tl.inline_asm_elementwise(_MMA_BF16, _MMA_CONSTRAINTS, args,
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_MMA_F16, _MMA_CONSTRAINTS, args,
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                         is_pure=True, pack=1)


@triton.jit
def _mma_acc(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7,
             x0, x1, x2, x3, x4, x5, x6, x7, a_g, a_h, c0, c1, c2, c3, IS_BF16: tl.constexpr):
    """C += (this step's C of rows g, g+8) * their absmax: c0, c1 belong to row g, c2, c3 to
    row g+8 (see the fragment table above)."""
    d0, d1, d2, d3 = _mma4(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7,
                           x0, x1, x2, x3, x4, x5, x6, x7, IS_BF16)
    return c0 + d0 * a_g, c1 + d1 * a_g, c2 + d2 * a_h, c3 + d3 * a_h


@triton.jit
def _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q,
               BS_SHIFT: tl.constexpr, BS2_SHIFT: tl.constexpr, NESTED: tl.constexpr,
               NCOL: tl.constexpr):
    """Everything one K step reads (issued one iteration ahead of its use): the words of rows g
    and g+8, the x fragments of 1 or 2 column groups (the second = the first when NCOL == 1),
    and the absmax of both rows (nested: the uint8 code and its block's absmax2)."""
    gw0, gw1 = _ld2(wg + q)
    hw0, hw1 = _ld2(wh + q)
    x0, x1, x2, x3 = _ld4(xp0 + 4 * q)
    x4, x5, x6, x7 = _ld4(xp0 + 4 * q + 4)
    if NCOL == 2:
        y0, y1, y2, y3 = _ld4(xp1 + 4 * q)
        y4, y5, y6, y7 = _ld4(xp1 + 4 * q + 4)
    else:
        y0, y1, y2, y3, y4, y5, y6, y7 = x0, x1, x2, x3, x4, x5, x6, x7
    kb = q >> BS_SHIFT                            # block in the row: q // (BS / 8), q >= 0
    if NESTED:
        ra_g = tl.load(amg + kb).to(tl.int32)      # uint8 code, widened at the load
        ra_h = tl.load(amh + kb).to(tl.int32)
        s2_g = tl.load(am2_ptr + ((bg + kb) >> BS2_SHIFT))
        s2_h = tl.load(am2_ptr + ((bh + kb) >> BS2_SHIFT))
    else:
        ra_g = tl.load(amg + kb)
        ra_h = tl.load(amh + kb)
        s2_g = ra_g
        s2_h = ra_h
    return (gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7,
            ra_g, ra_h, s2_g, s2_h)


@triton.jit
def _absmax_of(ra, s2, code2_ptr, off, NESTED: tl.constexpr):
    """float32 absmax from what ``_load_step`` read (double quantization: code2[q] * s2 + off)."""
    if NESTED:
        return tl.load(code2_ptr + ra) * s2 + off
    else:
        return ra


@triton.jit
def _compute_step(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
                  y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
                  code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
                  acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
                  NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr,
                  LUT: tl.constexpr):
    """Decode one step's 4 words, 4 (or 8) MMAs, and add C * absmax to the accumulators."""
    a_g = _absmax_of(ra_g, s2_g, code2_ptr, off, NESTED)
    a_h = _absmax_of(ra_h, s2_h, code2_ptr, off, NESTED)
    if LUT:                          # t0: this lane's base address in the shared table
        g0, g1, g2, g3 = _lut_pairs(gw0, t0)
        g4, g5, g6, g7 = _lut_pairs(gw1, t0)
        h0, h1, h2, h3 = _lut_pairs(hw0, t0)
        h4, h5, h6, h7 = _lut_pairs(hw1, t0)
    else:                            # t0..t7: the byte planes of the PRMT decoder
        g0, g1, g2, g3 = decode_pairs(gw0, t0, t1, t2, t3, t4, t5, t6, t7)
        g4, g5, g6, g7 = decode_pairs(gw1, t0, t1, t2, t3, t4, t5, t6, t7)
        h0, h1, h2, h3 = decode_pairs(hw0, t0, t1, t2, t3, t4, t5, t6, t7)
        h4, h5, h6, h7 = decode_pairs(hw1, t0, t1, t2, t3, t4, t5, t6, t7)
    acc0, acc1, acc2, acc3 = _mma_acc(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5,
                                      h6, h7, x0, x1, x2, x3, x4, x5, x6, x7, a_g, a_h, acc0,
                                      acc1, acc2, acc3, IS_BF16)
    if NCOL == 2:
        acc4, acc5, acc6, acc7 = _mma_acc(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4,
                                          h5, h6, h7, y0, y1, y2, y3, y4, y5, y6, y7, a_g, a_h,
                                          acc4, acc5, acc6, acc7, IS_BF16)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _mm4_mma_kernel(x_ptr, w_ptr, tab_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, bias_ptr, y_ptr,
                    ws_ptr, cnt_ptr, M, N, K, KB, stride_xm, stride_ym, PER, TILES, N_SPLIT,
                    BS_SHIFT: tl.constexpr, BS2_SHIFT: tl.constexpr, NESTED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr,
                    UNROLL: tl.constexpr, WARPS: tl.constexpr, LUT: tl.constexpr):
    """y[:M, 16 rows pid_n] over K range [pid_k*PER, +PER); grid (TILES x N_SPLIT,), program id
    = pid_n + TILES * pid_k.

    x_ptr / w_ptr: int32 views (x pairs, packed words); tab_ptr: 32 copies of the PRMT byte
    planes, or (LUT) the 256 code pairs; NCOL column groups of 8 rows of x."""
    THREADS: tl.constexpr = 32 * WARPS
    tid = _thread_ids(THREADS)
    lane = tid % 32
    g = lane // 4
    t = lane % 4
    if LUT:
        # tab_ptr: the 256 pairs; warp w fills entries w, w + WARPS, ..., lane l copy l
        lut = _lut_base(tid)
        for i in range(0, 256 // WARPS):
            e = (tid // 32) + WARPS * i
            _st_shared(lut + (e * 32 + lane) * 4, tl.load(tab_ptr + e))
        tl.debug_barrier()
        t0 = lut + 4 * lane
        dec = (t0, t0, t0, t0, t0, t0, t0, t0)      # the decoder's context: the lane's base
    else:
        # the byte planes in ordinary registers: each lane loads its own copy (loaded from one
        # address ptxas keeps them in uniform registers and copies them out before every prmt)
        tabp = tab_ptr + 8 * lane
        t0, t1, t2, t3 = _ld4(tabp)
        t4, t5, t6, t7 = _ld4(tabp + 4)
        dec = (t0, t1, t2, t3, t4, t5, t6, t7)
    off = tl.load(off_ptr) if NESTED else 0.0
    pid_n = tl.program_id(0) % TILES
    pid_k = tl.program_id(0) // TILES
    row_g = pid_n * 16 + g                          # all warps: the same 16 rows of W
    row_h = row_g + 8
    ld_g = tl.minimum(row_g, N - 1)                 # rows past N: load row N-1, store nothing
    ld_h = tl.minimum(row_h, N - 1)
    KQ = K // 8
    wg = w_ptr + ld_g.to(tl.int64) * KQ + 2 * t
    wh = w_ptr + ld_h.to(tl.int64) * KQ + 2 * t
    # B columns past M read row M-1: their C columns are never stored
    xp0 = x_ptr + tl.minimum(g, M - 1).to(tl.int64) * (stride_xm // 2) + 8 * t
    xp1 = x_ptr + tl.minimum(g + 8, M - 1).to(tl.int64) * (stride_xm // 2) + 8 * t
    bg = ld_g * KB
    bh = ld_h * KB
    zero = tl.zeros([THREADS], dtype=tl.float32)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero)   # rows g, g+8 x 2 (x 2 groups)
    # software pipelined: the loads of the next UNROLL steps are in flight while this
    # iteration's steps are decoded and multiplied
    q_lo = pid_k * (PER // 8)                       # in words of a row (8 codes each)
    q_hi = tl.minimum(K // 8, q_lo + PER // 8)
    S: tl.constexpr = STEP // 8
    # warp w takes step w of every WARPS consecutive steps: together a program reads
    # WARPS * 32 contiguous bytes of each of its 16 rows at a time
    qw = (tid // 32) * S
    amg = am_ptr + bg                               # this lane's two rows of absmax
    amh = am_ptr + bh
    st = S * WARPS                                  # words between a warp's consecutive steps
    a = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q_lo + qw, BS_SHIFT, BS2_SHIFT,
                   NESTED, NCOL)
    if UNROLL >= 2:
        b = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q_lo + st + qw, BS_SHIFT,
                       BS2_SHIFT, NESTED, NCOL)
    if UNROLL == 4:
        c = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q_lo + 2 * st + qw,
                       BS_SHIFT, BS2_SHIFT, NESTED, NCOL)
        d = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q_lo + 3 * st + qw,
                       BS_SHIFT, BS2_SHIFT, NESTED, NCOL)
    for q in range(q_lo + st * UNROLL, q_hi, st * UNROLL):
        na = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q + qw, BS_SHIFT,
                        BS2_SHIFT, NESTED, NCOL)
        acc = _compute_step(*a, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
        a = na
        if UNROLL >= 2:
            nb = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q + st + qw, BS_SHIFT,
                            BS2_SHIFT, NESTED, NCOL)
            acc = _compute_step(*b, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
            b = nb
        if UNROLL == 4:
            nc = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q + 2 * st + qw,
                            BS_SHIFT, BS2_SHIFT, NESTED, NCOL)
            acc = _compute_step(*c, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
            c = nc
            nd = _load_step(wg, wh, xp0, xp1, amg, amh, am2_ptr, bg, bh, q + 3 * st + qw,
                            BS_SHIFT, BS2_SHIFT, NESTED, NCOL)
            acc = _compute_step(*d, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
            d = nd
    acc = _compute_step(*a, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
    if UNROLL >= 2:
        acc = _compute_step(*b, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
    if UNROLL == 4:
        acc = _compute_step(*c, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
        acc = _compute_step(*d, code2_ptr, off, *dec, *acc, NESTED, IS_BF16, NCOL, LUT)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc
    # sum the warps' partial C (logical element = thread id: the lane's values in warp order)
    acc0 = tl.sum(tl.reshape(acc0, (WARPS, 32)), axis=0)
    acc1 = tl.sum(tl.reshape(acc1, (WARPS, 32)), axis=0)
    acc2 = tl.sum(tl.reshape(acc2, (WARPS, 32)), axis=0)
    acc3 = tl.sum(tl.reshape(acc3, (WARPS, 32)), axis=0)
    ln = tl.arange(0, 32)                           # lane of each element from here on
    row_g = pid_n * 16 + ln // 4
    row_h = row_g + 8
    m0 = 2 * (ln % 4)
    # [32, 2 (rows g, g+8), 2 (x rows 2t, 2t+1)] (x 2 column groups)
    out = tl.join(tl.join(acc0, acc1), tl.join(acc2, acc3))
    rows = tl.join(tl.join(row_g, row_g), tl.join(row_h, row_h))
    ms = tl.join(tl.join(m0, m0 + 1), tl.join(m0, m0 + 1))
    if NCOL == 2:
        acc4 = tl.sum(tl.reshape(acc4, (WARPS, 32)), axis=0)
        acc5 = tl.sum(tl.reshape(acc5, (WARPS, 32)), axis=0)
        acc6 = tl.sum(tl.reshape(acc6, (WARPS, 32)), axis=0)
        acc7 = tl.sum(tl.reshape(acc7, (WARPS, 32)), axis=0)
        out = tl.join(out, tl.join(tl.join(acc4, acc5), tl.join(acc6, acc7)))
        rows = tl.join(rows, rows)
        ms = tl.join(ms, ms + 8)
    mask = (rows < N) & (ms < M)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(out)
    _epilogue(out, bias, y_ptr, ms.to(tl.int64) * stride_ym + rows, ws_ptr, ms * N + rows, mask,
              cnt_ptr, pid_n, pid_k, N_SPLIT, M * N)


# ---------------------------------------------------------------------------------------------
# Host side: eligibility, split-K sizing, tile choice and launch (``matmul4bit.py`` dispatches)
# ---------------------------------------------------------------------------------------------
_MMA_STEP = STEP.value


class MmaTile(NamedTuple):
    """A launch of the mma kernel: warps per program (sharing 16 rows of W), K steps in flight
    per warp, programs per SM the split-K sizing aims for, and the shared-table decoder (else
    PRMT)."""
    warps: int
    unroll: int
    per_sm: int
    lut: bool = False

    def chunk(self) -> int:
        """K codes a program consumes per loop iteration: a K split is a multiple of it."""
        return _MMA_STEP * self.warps * self.unroll


# The tuner's tiles (each with its split-K sizing and unsplit, ``_mma_candidates``); the fastest
# per (M bucket, N, K, blocksize, nesting, dtype, bias, split_k) is picked by timing CUDA-graph
# replays on rotated weight copies once. The shared-table decoder is not among
# them: it was slower on every shape measured (H200, 75.3 vs 69.5 us on 28672x8192 at M = 1,
# results/logs/h200_mma_probe_s16_lut.log); pin MmaTile(w, u, p, True) to use it.
MMA_CONFIGS = [MmaTile(4, 2, 4), MmaTile(4, 4, 4), MmaTile(8, 2, 2), MmaTile(2, 2, 8),
               MmaTile(4, 1, 8), MmaTile(1, 1, 16)]
_PAIRS: Dict[Tuple, tuple] = {}
MMA_TIMES: Dict[Tuple, list] = {}
_MMA_BEST: Dict[Tuple, tuple] = {}
_TAB32: Dict[Tuple, tuple] = {}


def _mma_device_unfit(x: torch.Tensor) -> Optional[str]:
    """Why the mma.sync kernel cannot run where x lives, or None if it can."""
    if not x.is_cuda or _interpreting():
        return "needs a CUDA tensor (its inline PTX does not run interpreted)"
    if not prmt_decoder_ok(x.device, x.dtype):
        return "needs the PRMT decoder, which failed its on-device check"
    return None


def _mma_unfit(x: torch.Tensor, q) -> Optional[str]:
    """Why the mma.sync kernel cannot take x and this weight, or None if it can."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"takes bfloat16 or float16 x, got {x.dtype}"
    if not (q.fast and q.K % _MMA_STEP == 0 and q.bs % _MMA_STEP == 0):
        return (f"needs K and the blocksize to be multiples of {_MMA_STEP}, got K = {q.K}, "
                f"blocksize = {q.bs}")
    if q.bs2 & (q.bs2 - 1):
        return f"needs a power-of-two nested blocksize, got {q.bs2}"
    if x.data_ptr() % 16 or x.stride(0) % 8:
        return "needs x rows on 16-byte boundaries"
    return _mma_device_unfit(x)


def _tab32(tab: torch.Tensor) -> torch.Tensor:
    """The 8 byte-plane words repeated once per lane (int32 [256]): each lane loads its own copy,
    so the planes stay in ordinary registers (see the kernel)."""
    key = (tab.data_ptr(), str(tab.device))
    hit = _TAB32.get(key)
    if hit is None or hit[0]() is not tab:
        hit = (weakref.ref(tab), tab.repeat(32))
        _cache_put(_TAB32, key, hit)
    return hit[1]


def _pairs(table: torch.Tensor) -> torch.Tensor:
    """int32 [256]: for each byte value b, the 16-bit codes table[b >> 4] (low half: the high
    nibble is the first element) and table[b & 15] (high half), for the shared-memory decoder."""
    key = (table.data_ptr(), str(table.device))
    hit = _PAIRS.get(key)
    if hit is None or hit[0]() is not table:
        bits = table.view(torch.int16).to(torch.int64) & 0xFFFF
        b = torch.arange(256, device=table.device)
        v = bits[b >> 4] | bits[b & 15] << 16
        hit = (weakref.ref(table), torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32))
        _cache_put(_PAIRS, key, hit)
    return hit[1]


def _mma_splits(cfg, M: int, N: int, K: int, device, split_k: Optional[int] = None
                ) -> Tuple[int, int]:
    """(splits, K per split) for tile ``cfg`` (``MmaTile`` fields): whole chunks of 64 x warps x
    unroll per split, no empty split; ``split_k`` asks for that many (fewer if K has fewer
    chunks), else about ``per_sm`` programs per SM with partials at most the packed weight's K/2
    bytes a row."""
    cfg = MmaTile(*cfg)
    chunk, per_sm = cfg.chunk(), cfg.per_sm
    units = K // chunk
    if split_k:
        s = split_k
    else:
        s = max(1, min(_cdiv(per_sm * _num_sms(device), _cdiv(N, 16)), MAX_SPLIT,
                       max(1, K // (16 * M))))
    per = _cdiv(units, min(s, units))
    return _cdiv(units, per), per * chunk


def _cold_copies(q, l2_multiple: float = 2.5, most: int = 16) -> list:
    """``q`` and copies of its packed weight and absmax, together about ``l2_multiple`` x the L2
    (at most ``most``), so that tiles are timed the way ``bench_kernels`` measures them and a
    decoding model meets its weights: in DRAM, every other layer having passed through L2 since
    (replays on one weight under ~50 MB read it partly from L2). Fewer copies if memory is
    short. The small nested tables (absmax2, code2, offset) are shared; without double
    quantization the kernel does not read them."""
    size = q.weight.numel() * q.weight.element_size() + q.absmax.numel() * q.absmax.element_size()
    reps = [q]
    try:
        for _ in range(tuning.l2_copies(size, q.weight.device, l2_multiple, 1, most) - 1):
            r = copy.copy(q)
            r.weight, r.absmax = q.weight.clone(), q.absmax.clone()
            reps.append(r)
    except torch.OutOfMemoryError:
        pass
    return reps


def _mma_candidates(M: int, N: int, K: int, device, split_k: Optional[int]) -> list:
    """(tile, split_k) pairs the tuner times: every tile of MMA_CONFIGS whose K chunk divides K,
    with its ``per_sm`` split-K sizing and, where that splits, also unsplit (on the H200 unsplit
    was up to 1.5x faster on 4096x4096 and 4096x14336 at M = 1, the sizing on others:
    ``results/logs/h200_mma_sweep_s17.log``)."""
    out = []
    for c in MMA_CONFIGS:
        if K % c.chunk():
            continue
        out.append((c, split_k))
        if split_k is None and _mma_splits(c, M, N, K, device)[0] > 1:
            out.append((c, 1))
    return out


def _mma(x, q, bias, out, M, N, K, config, split_k, check: bool = True) -> None:
    """Launch ``_mm4_mma_kernel`` with ``config`` (``MmaTile`` fields) or the fastest
    (tile, split-K) of ``_mma_candidates`` (timed once per key on rotated copies of the weight;
    PEFTLAB_GEMV_TUNE=0 takes the first, untimed). ``check``: validate x and the weight (the
    default dispatch has already)."""
    if config is not None:
        try:
            config = MmaTile(*config)
        except TypeError:
            raise QuantError(f"matmul_4bit: mma tile {tuple(config)} is not (warps, unroll, "
                             f"programs per SM[, lut])") from None
        if config.unroll not in (1, 2, 4) or config.warps not in (1, 2, 4, 8):
            raise QuantError(f"matmul_4bit: mma tile {tuple(config)}: unroll must be 1, 2 or 4 "
                             f"and warps 1, 2, 4 or 8")
    why = _mma_unfit(x, q) if check else None
    if why is not None or M > 16:
        raise QuantError(f"matmul_4bit: the mma kernel {why or f'takes M <= 16 rows, got {M}'}")
    table, tab = _tables(q.code, x.dtype)
    x32 = x.view(torch.int32)
    bias_t = bias.contiguous() if bias is not None else out

    def launch(cfg, split, q=q):
        warps, unroll, _, lut = MmaTile(*cfg)
        s, per = _mma_splits(cfg, M, N, K, x.device, split)
        tiles = _cdiv(N, 16)
        _mm4_mma_kernel[(tiles * s,)](
            x32, q.weight, _pairs(table) if lut else _tab32(tab), q.absmax, q.am2, q.code2,
            q.off, bias_t, out, _workspace(s, M, N, x.device), _counters(x.device, tiles), M,
            N, K, K // q.bs, x.stride(0), out.stride(0), per, tiles, s,
            BS_SHIFT=(q.bs // 8).bit_length() - 1, BS2_SHIFT=q.bs2.bit_length() - 1,
            NESTED=q.nested, HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16,
            NCOL=1 if M <= 8 else 2, UNROLL=unroll, WARPS=warps, LUT=lut, num_warps=warps)

    if config is None:
        key = (_m_bucket(M), N, K, q.bs, q.nested, x.dtype, bias is not None, str(x.device),
               split_k)
        pick = _MMA_BEST.get(key)
        if pick is None:
            cands = _mma_candidates(M, N, K, x.device, split_k)
            if (os.environ.get("PEFTLAB_GEMV_TUNE", "1") == "0"
                    or x.is_cuda and torch.cuda.is_current_stream_capturing()):
                pick = cands[0]             # no timing (or inside a user's graph capture)
            else:                           # GPU time from graph replays, not launch cost
                reps = _cold_copies(q)
                turn = itertools.count()

                def rotated(c):             # each replayed call reads the next weight copy
                    return launch(*c, reps[next(turn) % len(reps)])
                pick, MMA_TIMES[key] = fastest(
                    cands, lambda c: tuning.graph_ms(lambda: rotated(c), calls=max(10, len(reps))),
                    "matmul_4bit mma")
                _MMA_BEST[key] = pick
                del reps
        config, split_k = pick
    elif K % config.chunk():
        raise QuantError(f"matmul_4bit: mma tile {config} takes K in chunks of "
                         f"{_MMA_STEP} x {config.warps} warps x {config.unroll} steps, which do "
                         f"not divide K = {K}")
    launch(config, split_k)


def mma_choice(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16, bias: bool = False,
               split_k: Optional[int] = None) -> Optional[tuple]:
    """((tile, split_k), [((tile, split_k), ms) of every candidate]) that the tuner picked for
    this shape, x dtype, bias and pinned split_k (None: the tile's own sizing or unsplit), or
    None if it has not run for them."""
    mb = _m_bucket(M)
    return next(((v, MMA_TIMES.get(k, [])) for k, v in _MMA_BEST.items()
                 if k[:3] == (mb, N, K) and k[5:7] == (dtype, bias) and k[-1] == split_k), None)


def mma_describe(pick) -> str:
    """A (tile, split_k) pick as text: ``w4 u2 p4 split auto`` (``+lut`` for the table decoder)."""
    if not isinstance(pick, tuple) or len(pick) != 2:
        return str(pick)
    tile, split = MmaTile(*pick[0]), pick[1]
    return (f"w{tile.warps} u{tile.unroll} p{tile.per_sm}{'+lut' if tile.lut else ''} "
            f"split {split or 'auto'}")
