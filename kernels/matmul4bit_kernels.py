"""Fused 4-bit matmul: ``y = x @ dequant(W)^T (+ bias)`` and ``grad_x = grad_y @ dequant(W)``.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3, eq. 5) keeps the frozen weight
``W [N, K]`` (out_features x in_features) in 4 bits and computes, in the 16-bit compute dtype,

    Y = X · doubleDequant(c1, c2, W_4bit)^T          X [M, K], Y [M, N]
    W[n, k] = code[q_e] * absmax[e // B],  e = n*K + k (flattened row-major index)
    absmax[b] = code2[qa_b] * absmax2[b // B2] + offset        (double quantization, eq. 6)

with bitsandbytes' storage: two 4-bit indices per byte, the first element in the high nibble
(``packed`` uint8, (N*K+1)//2 bytes), blocks of ``B`` consecutive flattened elements (a block may
straddle two rows when K % B != 0), ``code`` the 16-entry NF4/FP4 table. Here the weight is
decoded inside the kernels, tile by tile in registers: the full-precision W never exists in
memory. Two kernels tiled around ``tl.dot`` (tensor cores, float32 accumulator) and an opt-in
CUDA-core GEMV:

* ``_mm4_fwd_kernel``, every M. Per K step a program loads an x tile [BM, BK] and the packed
  weight words [BN, BK/8] (int32: 8 weights each, 16-byte vectors), decodes them with
  ``decode4bit.decode8`` (PRMT byte permutes from a register-resident table, ~3 instructions per
  weight; a table-gather twin elsewhere), interleaves the 8 codes of each word back into memory
  order (``tl.join``, in registers) and multiplies. BK = min(64, B), so with K % B == 0 a K step
  of a row lies inside one quantization block: one absmax per row per step (double quantization
  decoded in-kernel); the absmax and the packed words of the next K step are loaded one step
  ahead (register double buffering). Where the absmax is applied depends on M:
    - small M (BM <= 32; decode, M = 1..32; on CUDA, M <= 16 goes to the faster mma.sync
      kernel of ``matmul4bit_mma.py`` by default): on the accumulator, ``acc += dot(x, codes^T) *
      absmax[None, :]`` (BM*BN multiplies per step instead of BN*BK). Memory bound: each weight
      byte is read once per row tile, and split-K (below) gives every SM several programs with
      2-4 pipelined K steps of 16-byte loads in flight. M = 1 pays the same as M = 16 (the MMA
      pads rows for free, mma.sync m16n8k16).
    - large M (prefill, training): on the weight tile in the compute dtype (bf16 multiply, fp32
      for fp16) before the dot, so the accumulation stays a chain of wgmma; big tiles (128x128 to
      256x128) reuse each decoded weight tile for 128-256 rows of x (decode / MMA ~ 1 / BM).
* ``_mm4_gemv_kernel`` (opt-in, ``matmul4bit.GEMV_MAX_M``; slower than the split-K MMA path at
  every measured M = 1..8 on the H200, being issue-bound on decode + conversion + FMA): no
  tensor cores. The decoded codes stay de-interleaved (code j of every word), x is loaded
  de-interleaved to match, and the products are reduced in float32 registers (derivation in
  its docstring); with PREFETCH the next K step's words are loaded before this step's decode.
  Split-K as below.
* ``_mm4_bwd_kernel``: ``grad_x [M, K] = grad_y [M, N] @ W [N, K]``; the same decoded tile, now
  reduced over N (rows of W, each with its own absmax, scaled per element), output [BM, BK].

Split-K (small M, few output tiles) runs in ONE launch: each program stores its float32 partial
tile to a workspace ``[S, M, N]``, then bumps a per-tile counter (bar.sync + acq_rel atomic);
the program that arrives last sums the S partials in a fixed order (deterministic), adds the
bias, writes y and resets the counter to 0 for the next call (counters are cached per device
and stream). When K % B != 0, B < 32 or K is odd (blocks straddle rows, bytes straddle rows),
a general tile decodes every element from its flattened index (correct, slower; its loop is not
software-pipelined, ``LOOP_STAGES = 1``: staging its per-element absmax gathers through shared
memory would need more than the SM has). Tables are 16-bit (float16 for float32 x, exact to
2^-11, below TF32's 2^-10), so the gathers stay plain L1 loads.

Shapes: x [M, K] float16/bfloat16/float32 (row-contiguous), packed uint8 [(N*K+1)//2] (any
shape with that many bytes), absmax float32 [nb] or uint8 [nb] (nested, with absmax2 float32
[ceil(nb/B2)], code2 float32 [256], offset float32 [1]), code float32 [16], bias [N] or None;
y [M, N] in x's dtype. Float32 x uses the tensor cores' default precision (TF32) for ``tl.dot``
and the table decoder.

Host side (argument checks, split-K sizing, dispatch, autograd): ``matmul4bit.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode4bit import decode8, interleave8, table_planes


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, blk, mask,
                  NESTED: tl.constexpr, BS2: tl.constexpr):
    """float32 absmax of quantization blocks ``blk`` (any shape); 0 where ``mask`` is False."""
    if NESTED:
        q = tl.load(am_ptr + blk, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(am2_ptr + blk // BS2, mask=mask, other=0.0)
        a = tl.load(code2_ptr + q) * s2 + tl.load(off_ptr)
        a = tl.where(mask, a, 0.0)
    else:
        a = tl.load(am_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _fast_words(w32_ptr, rows, rmask, q0, KQ, BK: tl.constexpr):
    """The int32 words [BN, BK/8] of W[rows, 8*q0 : 8*q0+BK] (KQ = K / 8 words per row)."""
    qj = q0 + tl.arange(0, BK // 8)
    return tl.load(w32_ptr + rows.to(tl.int64)[:, None] * KQ + qj[None, :], mask=rmask[:, None],
                   other=0)


@triton.jit
def _fast_decode(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7, BN: tl.constexpr,
                 BK: tl.constexpr, USE_PRMT: tl.constexpr):
    """Codes (unscaled) [BN, BK] in the table's dtype of the words ``wd`` [BN, BK/8], in memory
    order."""
    v0, v1, v2, v3, v4, v5, v6, v7 = decode8(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                                             USE_PRMT)
    return tl.reshape(interleave8(v0, v1, v2, v3, v4, v5, v6, v7), (BN, BK))


@triton.jit
def _scaled(w, a, IS_BF16: tl.constexpr, DOT_F32: tl.constexpr):
    """Weight codes [R, C] times the per-row absmax ``a`` [R]: bf16 in bf16 (one rounding more
    than the reference, ~2^-9), else in float32 and back (float32 under DOT_F32)."""
    if DOT_F32:
        return w.to(tl.float32) * a[:, None]
    elif IS_BF16:
        return w * a.to(tl.bfloat16)[:, None]
    else:
        return (w.to(tl.float32) * a[:, None]).to(w.dtype)


@triton.jit
def _general_tile(w_ptr, code_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask, k0, K,
                  BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr):
    """W[rows, k0:k0+BK] in float32, every element decoded from its flattened index."""
    kk = k0 + tl.arange(0, BK)
    e = rows.to(tl.int64)[:, None] * K + kk[None, :]
    m = rmask[:, None] & (kk < K)[None, :]
    b = tl.load(w_ptr + (e >> 1), mask=m, other=0).to(tl.int32)
    nib = (b >> (4 - 4 * (e & 1)).to(tl.int32)) & 15
    a = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, e // BS, m, NESTED, BS2)
    return tl.load(code_ptr + nib).to(tl.float32) * a


@triton.jit
def _epilogue(acc, bias, y_ptr, y_offs, ws_ptr, ws_offs, mask, cnt_ptr, tile, pid_k, n_split,
              MN):
    """Store ``acc + bias`` (one split), or split-K: partial -> workspace; last one reduces."""
    if n_split == 1:
        tl.store(y_ptr + y_offs, (acc + bias).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * MN + ws_offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == n_split - 1:
            tot = tl.zeros_like(acc)
            for s in range(0, n_split):
                tot += tl.load(ws_ptr + s * MN + ws_offs, mask=mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(y_ptr + y_offs, (tot + bias).to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles at a time (L2 reuse of W)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mm4_fwd_kernel(x_ptr, w_ptr, code_ptr, tab_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr,
                    bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, KQ, KB, stride_xm, stride_ym,
                    M_BUCKET,
                    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, FAST: tl.constexpr, BK: tl.constexpr,
                    USE_PRMT: tl.constexpr, IS_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                    LOOP_STAGES: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """y tile [BM, BN] = x[BM, K-range] @ W[BN, K-range]^T; grid (tiles, splits)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    rows = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    rmask = rows < N
    per = tl.cdiv(tl.cdiv(K, BK), n_split) * BK
    k_lo = pid_k * per
    k_hi = tl.minimum(K, k_lo + per)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    t0, t1, t2, t3, t4, t5, t6, t7 = table_planes(tab_ptr)
    if FAST:
        k_first = tl.where(k_lo < k_hi, k_lo, 0)
        a_next = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, rows * KB + k_first // BS,
                               rmask, NESTED, BS2)
        wd_next = _fast_words(w_ptr, rows, rmask, k_first // 8, KQ, BK)
    else:
        a_next = tl.zeros([BN], dtype=tl.float32)
        wd_next = tl.zeros([BN, BK // 8], dtype=tl.int32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k_it in tl.range(k_lo, k_hi, BK, num_stages=LOOP_STAGES):
        k0 = tl.multiple_of(k_it, BK)
        kk = k0 + tl.arange(0, BK)
        if FAST:
            xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None], other=0.0)
            a = a_next
            wd = wd_next
            k_n = tl.where(k0 + BK < k_hi, k0 + BK, k0)      # next step (or this one again)
            a_next = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, rows * KB + k_n // BS,
                                   rmask, NESTED, BS2)
            wd_next = _fast_words(w_ptr, rows, rmask, k_n // 8, KQ, BK)   # in flight meanwhile
            w = _fast_decode(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7, BN, BK, USE_PRMT)
            if BM <= 32:                       # small M: scale the partial product
                acc += _dot(xt, tl.trans(w), DOT_F32) * a[None, :]
            else:                              # large M: scale the tile, chain the dots
                acc = _dot(xt, tl.trans(_scaled(w, a, IS_BF16, DOT_F32)), DOT_F32, acc)
        else:
            xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            w = _general_tile(w_ptr, code_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask,
                              k0, K, BS, BS2, NESTED, BK)
            acc = _dot(xt, tl.trans(w), DOT_F32, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros([1, BN], dtype=tl.float32)
    mask = mmask[:, None] & rmask[None, :]
    _epilogue(acc, bias, y_ptr, offs_m.to(tl.int64)[:, None] * stride_ym + rows[None, :], ws_ptr,
              offs_m[:, None] * N + rows[None, :], mask, cnt_ptr, pid, pid_k, n_split, M * N)


@triton.jit
def _gemv_words(w32_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask, k0, K, KQ, KB,
                BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                NBK: tl.constexpr, WPB: tl.constexpr):
    """Packed words [BN, NBK, WPB] (int32, 8 codes each) of W[rows, k0 : k0 + 8*NBK*WPB] and the
    absmax [BN, NBK] of each word group (one quantization block, or part of one); 0 past K."""
    b = tl.arange(0, NBK)
    wq = (k0 // 8 + b[:, None] * WPB + tl.arange(0, WPB)[None, :])          # [NBK, WPB] words
    wmask = rmask[:, None, None] & (wq * 8 < K)[None, :, :]
    wd = tl.load(w32_ptr + rows.to(tl.int64)[:, None, None] * KQ + wq[None, :, :], mask=wmask,
                 other=0)
    kb = (k0 + b * (WPB * 8)) // BS                                           # [NBK] block in row
    amask = rmask[:, None] & (k0 + b * (WPB * 8) < K)[None, :]
    a = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, rows[:, None] * KB + kb[None, :],
                      amask, NESTED, BS2)
    return wd, a


@triton.jit
def _mm4_gemv_kernel(x_ptr, w_ptr, code_ptr, tab_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr,
                     bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, KQ, KB, stride_xm, stride_ym,
                     M_BUCKET,
                     BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, USE_PRMT: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, NBK: tl.constexpr, WPB: tl.constexpr,
                     PREFETCH: tl.constexpr, EVEN_K: tl.constexpr):
    """Small-M path on CUDA cores: y tile [BM, BN] over one K range; grid (N tiles, splits).

    Per step the program loads BN rows x 8*NBK*WPB weights as int32 words (16-byte vectors),
    decodes each word into its 8 codes e_j (``decode8``: e_j of word w is W[n, k0 + 8w + j]) and,
    instead of interleaving them back into memory order, loads x de-interleaved to match:
    ``x_j[m, w] = x[m, k0 + 8w + j]``. Products accumulate in float32 registers, one accumulator
    per (row of x, row of W, block, word lane), reduced across lanes once at the end:

        acc[m, n, b, w] += absmax[n, b] * sum_j x_j[m, b, w] * e_j[n, b, w]
        y[m, n]          = sum_{b, w} acc[m, n, b, w]                         (+ bias)

    so every weight costs its decode, one conversion and BM fused multiply-adds: no tensor-core
    layout shuffle, no shared memory, no cross-lane traffic inside the loop. With PREFETCH the
    next step's words are loaded before this step's decode (register double buffering). Needs
    the fast layout (K % B == 0, B >= 32): WPB = min(B, BK) / 8 words per block, NBK blocks per
    step; EVEN_K: every step is whole (K range a multiple of BK), so x needs no mask.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_split = tl.num_programs(1)
    BK: tl.constexpr = 8 * NBK * WPB
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    per = tl.cdiv(tl.cdiv(K, BK), n_split) * BK
    k_lo = pid_k * per
    k_hi = tl.minimum(K, k_lo + per)
    t0, t1, t2, t3, t4, t5, t6, t7 = table_planes(tab_ptr)
    kpos = tl.arange(0, NBK)[:, None] * (WPB * 8) + tl.arange(0, WPB)[None, :] * 8   # word starts
    xo = offs_m.to(tl.int64)[:, None, None, None] * stride_xm + kpos[None, None]  # [BM,1,NBK,WPB]
    acc = tl.zeros([BM, BN, NBK, WPB], dtype=tl.float32)
    if PREFETCH:
        wd_n, a_n = _gemv_words(w_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask, k_lo, K,
                                KQ, KB, BS, BS2, NESTED, NBK, WPB)
    for k0 in range(k_lo, k_hi, BK):
        if PREFETCH:
            wd = wd_n
            a = a_n
            n_live = tl.where(k0 + BK < k_hi, N, 0)             # no prefetch past this split
            wd_n, a_n = _gemv_words(w_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows,
                                    rows < n_live, k0 + BK, K, KQ, KB, BS, BS2, NESTED, NBK, WPB)
        else:
            wd, a = _gemv_words(w_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask, k0, K,
                                KQ, KB, BS, BS2, NESTED, NBK, WPB)
        if EVEN_K:
            xm = mmask[:, None, None, None]
        else:
            xm = mmask[:, None, None, None] & (k0 + kpos < k_hi)[None, None]
        e0, e1, e2, e3, e4, e5, e6, e7 = decode8(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                                                 USE_PRMT)
        xp = x_ptr + k0 + xo
        part = tl.load(xp, mask=xm, other=0.0).to(tl.float32) * e0.to(tl.float32)[None]
        part += tl.load(xp + 1, mask=xm, other=0.0).to(tl.float32) * e1.to(tl.float32)[None]
        part += tl.load(xp + 2, mask=xm, other=0.0).to(tl.float32) * e2.to(tl.float32)[None]
        part += tl.load(xp + 3, mask=xm, other=0.0).to(tl.float32) * e3.to(tl.float32)[None]
        part += tl.load(xp + 4, mask=xm, other=0.0).to(tl.float32) * e4.to(tl.float32)[None]
        part += tl.load(xp + 5, mask=xm, other=0.0).to(tl.float32) * e5.to(tl.float32)[None]
        part += tl.load(xp + 6, mask=xm, other=0.0).to(tl.float32) * e6.to(tl.float32)[None]
        part += tl.load(xp + 7, mask=xm, other=0.0).to(tl.float32) * e7.to(tl.float32)[None]
        acc += part * a[None, :, :, None]
    out = tl.sum(tl.sum(acc, axis=3), axis=2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros([1, BN], dtype=tl.float32)
    mask = mmask[:, None] & rmask[None, :]
    _epilogue(out, bias, y_ptr, offs_m.to(tl.int64)[:, None] * stride_ym + rows[None, :], ws_ptr,
              offs_m[:, None] * N + rows[None, :], mask, cnt_ptr, pid_n, pid_k, n_split, M * N)


@triton.jit
def _mm4_bwd_kernel(g_ptr, w_ptr, code_ptr, tab_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr,
                    dx_ptr, M, N, K, KQ, KB, stride_gm, stride_dxm, M_BUCKET,
                    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                    FAST: tl.constexpr, BK: tl.constexpr, USE_PRMT: tl.constexpr,
                    IS_BF16: tl.constexpr, DOT_F32: tl.constexpr, LOOP_STAGES: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """grad_x tile [BM, BK] = grad_y[BM, :] @ W[:, BK cols]; reduction over N in steps of BN."""
    pid = tl.program_id(0)
    pid_m, pid_k = _grouped_tile(pid, M, K, BM, BK, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    kk = k0 + tl.arange(0, BK)
    mmask = offs_m < M
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    rows0 = tl.arange(0, BN)
    t0, t1, t2, t3, t4, t5, t6, t7 = table_planes(tab_ptr)
    if FAST:
        a_next = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, rows0 * KB + k0 // BS,
                               rows0 < N, NESTED, BS2)
    else:
        a_next = tl.zeros([BN], dtype=tl.float32)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in tl.range(0, N, BN, num_stages=LOOP_STAGES):
        rows = n0 + rows0
        rmask = rows < N
        gt = tl.load(g_rows + rows[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        if FAST:
            a = a_next
            nxt = rows + BN
            a_next = _block_absmax(am_ptr, am2_ptr, code2_ptr, off_ptr, nxt * KB + k0 // BS,
                                   nxt < N, NESTED, BS2)
            w = _fast_decode(_fast_words(w_ptr, rows, rmask, k0 // 8, KQ, BK), code_ptr, t0, t1,
                             t2, t3, t4, t5, t6, t7, BN, BK, USE_PRMT)
            acc = _dot(gt, _scaled(w, a, IS_BF16, DOT_F32), DOT_F32, acc)
        else:
            w = _general_tile(w_ptr, code_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, rows, rmask,
                              k0, K, BS, BS2, NESTED, BK)
            acc = _dot(gt, w, DOT_F32, acc)
    mask = mmask[:, None] & (kk < K)[None, :]
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + kk[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, acc=None):
    """tl.dot(a, b in a's dtype); DOT_F32 (the interpreter with bf16, whose dot and arithmetic
    work on the raw storage integers) multiplies in float32 instead."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b.to(a.dtype), acc)


# ---------------------------------------------------------------------------------------------
# Autotuning: small spaces (tuning takes seconds), keyed on the M bucket and the shape
# ---------------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, maxnreg=None, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# (max M of the bucket) -> tile configs; the first entry is also the interpreter's choice.
# Small M: BN rows of W per program, split-K fills the GPU. Large M: Triton waits for each wgmma
# before the next decode, so decode and MMA overlap only across programs: 128x128 tiles with 8
# warps capped at 128 registers (or 64x128 with 4 warps) fit 2-3 programs per SM; 128x256 and
# 256x128 (one per SM) amortize the decode over more rows instead.
_FWD_BUCKETS = {
    16: [_cfg(4, 4, BM=16, BN=64, GROUP_M=8), _cfg(4, 4, BM=16, BN=128, GROUP_M=8),
         _cfg(4, 3, BM=16, BN=256, GROUP_M=8)],
    32: [_cfg(4, 4, BM=32, BN=64, GROUP_M=8), _cfg(4, 4, BM=32, BN=128, GROUP_M=8)],
    64: [_cfg(4, 4, BM=64, BN=64, GROUP_M=8), _cfg(4, 4, BM=64, BN=128, GROUP_M=8)],
    256: [_cfg(4, 4, BM=64, BN=128, GROUP_M=8), _cfg(8, 3, 128, BM=128, BN=128, GROUP_M=8),
          _cfg(4, 4, BM=64, BN=64, GROUP_M=8)],
    1 << 62: [_cfg(8, 3, 128, BM=128, BN=128, GROUP_M=8), _cfg(4, 4, BM=64, BN=128, GROUP_M=8),
              _cfg(8, 3, BM=128, BN=256, GROUP_M=8), _cfg(8, 3, BM=256, BN=128, GROUP_M=8)],
}
_BWD_BUCKETS = {
    16: [_cfg(4, 4, BM=16, BN=64, GROUP_M=8), _cfg(4, 4, BM=16, BN=128, GROUP_M=8)],
    64: [_cfg(4, 4, BM=64, BN=64, GROUP_M=8), _cfg(4, 4, BM=32, BN=128, GROUP_M=8)],
    1 << 62: [_cfg(8, 3, 128, BM=128, BN=128, GROUP_M=8), _cfg(8, 3, BM=256, BN=64, GROUP_M=8),
              _cfg(4, 4, BM=128, BN=64, GROUP_M=8)],
}


def _bucket_configs(buckets, m_bucket):
    for top, cfgs in buckets.items():
        if m_bucket <= top:
            return cfgs
    raise AssertionError("unreachable")


def _prune_fwd(configs, named_args, **kwargs):
    return _bucket_configs(_FWD_BUCKETS, named_args["M_BUCKET"])


def _prune_bwd(configs, named_args, **kwargs):
    return _bucket_configs(_BWD_BUCKETS, named_args["M_BUCKET"])


def _all(buckets):
    return [c for cfgs in buckets.values() for c in cfgs]


_KEY = ["M_BUCKET", "N", "K", "NESTED", "FAST", "BS", "USE_PRMT"]
_mm4_fwd_tuned = triton.autotune(_all(_FWD_BUCKETS), key=_KEY + ["HAS_BIAS"],
                                 prune_configs_by={"early_config_prune": _prune_fwd})(
    _mm4_fwd_kernel)
_mm4_bwd_tuned = triton.autotune(_all(_BWD_BUCKETS), key=_KEY,
                                 prune_configs_by={"early_config_prune": _prune_bwd})(
    _mm4_bwd_kernel)
