"""Triton kernels for 4-bit NF4/FP4 quantize/dequantize with double quantization (QLoRA).

The math is in ``peftlab/quant/functional.py`` (QLoRA, arXiv 2305.14314, section 3, eq. 1-6):
per block of ``B`` elements ``absmax_b = max |W_i|``, ``q_i = nearest level of W_i / absmax_b``,
two 4-bit indices per byte (first element high), and double quantization of the absmax
constants with the 8-bit dynamic map in blocks of 256 (``peftlab/quant/blockwise8.py``). These
kernels are bit-exact twins of those references (tested interpreted on the CPU and on CUDA).

Design (the GPU goal is bandwidth: dequantize moves 0.5 B in and 2 B out per bf16 weight,
quantize 2 B in and 0.5 B out). Each direction has byte variants (any ``n``) and word variants
(whole 32-bit words of packed nibbles); a tiny tuner times them on CUDA and keeps the fastest.

* Dequantize, ``bytes`` (``_dequant4_kernel``): a program owns a ``[ROWS, COLS]`` tile of packed
  bytes (COLS divides ``B / 2`` so a tile row lies inside one quantization block) and writes
  ``[ROWS, 2 COLS]`` outputs. Nibbles are split with shifts, interleaved (``tl.interleave``: the
  high nibble is the even element), looked up in the 16-entry float32 code table (a gather
  that stays in L1) and scaled by the row's absmax. Interleaving leaves each thread 2 adjacent
  outputs, so stores are narrow.
* Dequantize, ``tile`` / ``tile1`` (``_dequant4t_kernel``, needs ``n % 8 == 0`` and a
  4-byte-aligned packed tensor): shaped like a widening copy — a 1-D run of int32 words (8
  codes each), ``[WORDS, 8]`` nibbles by broadcasting shifts (code ``k`` of a word at bit
  ``4 (k ^ 1)``), a gather per weight from the 16-entry float32 table (L1), the block's absmax
  per word (L1 hits within a block), one 16-byte store per word for 16-bit outputs. ``tile1``
  hints one word per thread (``tl.max_contiguous``): the load layout is the store layout, no
  conversion through shared memory; on the H200 the tuner picked it for every bf16 key of
  ``experiments/bench_quant.py`` (3.55-3.93 TB/s as CUDA-graph replays on 4096x14336 ..
  28672x8192: ``experiments/results/logs/h200_bench_quant.log``).
  Tried in session 15 and reverted: whole tiles without predicates (only the program holding
  the end masking its loads and stores, here and in quantize): dequantize 3.57 TB/s on
  4096x14336 against 3.60-3.61 in the run before, the quantize kernel 68.9-72.2 us against
  68.4-69.9 (graph replays, ``logs/h200_bench_quant_s15_nomask.log``): no gain.
  Both: ``value = code[q] * absmax_b`` in float32, rounded once to the output dtype. (Until
  session 12 the word variants decoded with ``decode4bit.decode8`` and assembled the outputs
  with ``tl.join``; their layouts cost a shared-memory round trip or several rows per thread,
  1.3 TB/s: ``experiments/results/h200_kernels.md``.)
* Double-quantized absmax is decoded in-kernel per tile row (``bytes``) or per word (``tile``)
  (``_block_absmax``, shared with the fused matmul in ``matmul4bit_kernels.py``):
  ``code2[qa_b] * absmax2[b // 256] + offset`` (compiled with ``enable_fp_fusion=False`` so the
  multiply and add round separately, as in the PyTorch reference).
* Quantize (``_quant4_kernel``): a program owns ``ROWS`` whole blocks ``[ROWS, B]``. Only the
  program holding the end of ``x`` loads with a per-element mask: when ``n`` is not a multiple
  of 16 (Triton specializes on that) such a mask splits every 16-byte load into 2-byte ones
  (``ld.global.b16`` in the PTX), so the others load unmasked.
  absmax: an integer row max over the bits of ``|x|`` (float ``tl.max`` skips NaN; this
  propagates it, as torch's amax does, so a NaN block fails the finite check). Normalisation
  by the correctly rounded reciprocal (``div_rn``; Triton's ``/`` is approximate on GPUs; the
  ragged last block divides, as the reference, and only the program holding it pays for the
  division; an all-zero block scales by 0). A flushing division would zero the reciprocal of an
  absmax above 2**126 and the subnormal quotients of a ragged block: ``div_rn`` lowers to
  ``div.rn.f32`` (IEEE, no flush; Triton 3.9's PTX for sm_90, compiled on the CPU), and both
  quantize kernels launch with ``enable_reflect_ftz=False`` so that no libdevice call could
  flush either (``test_subnormal_reciprocals_and_quotients``; the interpreter never flushes).
  No clamp to [-1, 1]: all decision bounds lie inside, so the index is unchanged. The code
  ``order[#(bounds < s)]`` (nearest level, ties to the lower one) comes without searching the
  15 bounds and with as few gathers as possible, because gathers are what the kernel spends
  its L1 on (Nsight Compute, session 13: L1/TEX 94 %), by tables built on the host
  (``kernels/quant4bit_tables.py``): NF4 (CODING 1, ``poly``) guesses the count with a cubic,
  three FMAs and one gather from a 128-byte table; FP4 (CODING 0, ``cells``) looks up a cell of
  ``round(16 |s|)`` split by sign, two 1-line gathers. Exact for every float32 ``s`` in
  [-1.0001, 1.0001] (all 2.13e9: ``experiments/quant_exhaustive_check.py``); the kernels are
  tested at every cell edge and bound +-2 ulps.
  On the H200 (``experiments/quant_kernel_probe.py``, 4096x14336, graph replays): traffic
  alone 50.6 us, + the cell index 51.1, session 13's 8-byte gather from a 64-entry table 84.8,
  FP4's two gathers 83.8 (78.5 for NF4 with cells of ``round(16 s)``), NF4's guess 65.0.
  Packing: ``bytes`` (``tl.split`` of pairs, uint8 stores) or ``words`` / ``words1``
  (``_pack8``: three ``tl.split`` levels, one int32 word per 8 codes in ``decode4bit.SHIFTS``
  order, stored through the byte pointer cast to int32; needs ``((n + 1) // 2) % 4 == 0``),
  ``words1`` again hinting one word per thread.
* ``_quant8_kernel`` / ``_dequant8_kernel``: blockwise 8-bit with a 256-entry code (nearest by
  an 8-step binary search over 255 bounds, or bitsandbytes' CPU 65536-entry lookup table); used
  for double quantization, with the ``absmax - offset`` subtraction fused (same float32
  subtraction), and exposed for the 8-bit optimizer.

``quantize_4bit_triton`` launches the 4-bit kernel first, then (while it runs) the mean and the
fused 8-bit kernel, whose program 0 also copies both code tables into the new state's own
tensors (no clone launches; without double quantization the 4-bit table is cloned), then reads
the mean back: absmax >= 0, so a finite mean proves every block finite; only a non-finite mean
scans absmax for the offending block (the reference's error). Without double quantization it
scans absmax (isfinite, any: the one sync). The call's host work (100-180 us on the H200's
hosts, ``experiments/quant_probe.py``) is more than its kernels at the middle sizes (about 75
us at 4096x14336), so what precedes the 4-bit launch is kept short, the rest overlaps that
kernel, every launch goes through ``launch.launch`` (the compiled kernel's launcher called
directly: 15-26 us per launch against Triton's 19-32 us) and no torch view op runs on the host
(a few us each: the word kernels cast the byte pointer). Since session 15 the 4-bit launch of a
known key is replayed (``_launch_quant4``: the recorded launch with five fresh pointers, no
tuner or argument keys): 132.8 / 140.1 us per NF4 / FP4 call at 4096x14336 against 136.9 /
153.6 through ``launch`` (``experiments/quant_probe.py --paths-only``).

Tuner: on CUDA each direction times every eligible (variant, elements per program, warps)
candidate once per (blocksize, size bucket, dtype, ...) key with ``do_bench`` and keeps the
fastest (a candidate that fails to compile is skipped with a warning), so the byte kernels
remain the floor; tensors under 2^20 elements take the first eligible candidate that
compiles, untimed. ``last_choice`` / ``tuner_choices`` report the winners. The interpreter runs
the first eligible variant on a small tile; ``forced_variant`` pins one (tests).

Rounding traps handled: bf16 output is rounded to nearest even by bit arithmetic when running
under ``TRITON_INTERPRET=1`` (whose float32->bfloat16 cast truncates); on the GPU the native
cast already rounds to nearest even. float16 casts round to nearest even in both places.
Entry points have the contracts of the references: ``quantize_4bit_triton``,
``dequantize_4bit_triton``, ``quantize_blockwise_8bit_triton``,
``dequantize_blockwise_8bit_triton``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Dict, List, Optional

import torch
import triton
import triton.testing
import triton.language as tl

from peftlab.quant.blockwise8 import (_check_dequant_args, check_quantize8_args, lut_table,
                                      num_blocks)
from peftlab.quant.codes import dynamic_map, get_code
from peftlab.quant.functional import (build_state, check_dequantize_args, check_finite_absmax,
                                      check_quantize_args)
from peftlab.quant.state import QuantState

from . import launch as _launch_mod
from .launch import launch, record
from .matmul4bit_kernels import _block_absmax
from .quant4bit_tables import cell_tables, poly_table
from .tuning import _UNTIMED, Candidate, Tuned, _interpreting

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_COLS_MAX = 64   # packed bytes per byte-dequant tile row (128 outputs)


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a constexpr function: slower to call)."""
    return -(-a // b)


@triton.jit
def _store_out(out_ptr, idx, v, mask, OUT: tl.constexpr, RNE_BITS: tl.constexpr):
    """Round float32 ``v`` once to the output dtype (0 f32, 1 f16, 2 bf16) and store."""
    if OUT == 0:
        tl.store(out_ptr + idx, v, mask=mask)
    elif OUT == 1:
        tl.store(out_ptr + idx, v.to(tl.float16), mask=mask)
    else:
        if RNE_BITS:
            u = v.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(out_ptr + idx, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + idx, v.to(tl.bfloat16), mask=mask)


@triton.jit
def _dequant4_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     out_ptr, n, nbytes, nblocks,
                     BS: tl.constexpr, BS2: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     NESTED: tl.constexpr, OUT: tl.constexpr, RNE_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS)                       # [ROWS] tile rows
    bidx = row[:, None] * COLS + tl.arange(0, COLS)[None, :]     # [ROWS, COLS] byte index
    byte = tl.load(packed_ptr + bidx, mask=bidx < nbytes, other=0)
    hi = (byte >> 4).to(tl.int32)
    lo = (byte & 15).to(tl.int32)
    vals = tl.load(code_ptr + tl.interleave(hi, lo))             # [ROWS, 2 COLS], L1 gather
    blk = (row * (2 * COLS)) // BS                               # block of each tile row
    am = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk < nblocks, NESTED,
                       BS2)
    eidx = row[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    _store_out(out_ptr, eidx, vals * am[:, None], eidx < n, OUT, RNE_BITS)


@triton.jit
def _dequant4t_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      out_ptr, nwords,
                      BS: tl.constexpr, BS2: tl.constexpr, WORDS: tl.constexpr,
                      NESTED: tl.constexpr, OUT: tl.constexpr, RNE_BITS: tl.constexpr,
                      ONE_WORD: tl.constexpr):
    """``tile``: WORDS int32 words -> ``[WORDS, 8]`` outputs built by broadcasting, the shape of
    a plain widening copy (nibble ``k`` of word ``i`` at bit ``SHIFTS[k] = 4 (k ^ 1)``), so the
    compiler keeps each word's 8 outputs in one thread for one 16-byte store without joins.
    ONE_WORD (``tile1``): one word per thread and load, no layout conversion before the store.
    ``packed_ptr`` (uint8, 4-byte aligned) is read as int32 words through a pointer cast."""
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    i = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    if ONE_WORD:
        i = tl.max_contiguous(i, 1)
    wmask = i < nwords
    wd = tl.load(words_ptr + i, mask=wmask, other=0)
    k = tl.arange(0, 8)
    nib = (wd[:, None] >> ((k ^ 1) * 4)[None, :]) & 15               # [WORDS, 8]
    am = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (i * 8) // BS,
                       wmask, NESTED, BS2)                            # [WORDS]
    vals = tl.load(code_ptr + nib) * am[:, None]
    eidx = i[:, None] * 8 + k[None, :]
    _store_out(out_ptr, eidx, vals, wmask[:, None], OUT, RNE_BITS)


@triton.jit
def _pack8(q, ROWS: tl.constexpr, W: tl.constexpr):
    """Codes ``[ROWS, 8 W]`` (0..15) -> ``[ROWS, W]`` int32 words, element e_k of each group of
    8 at bit ``SHIFTS[k]`` = 4, 0, 12, 8, 20, 16, 28, 24 (the byte packing read little-endian).
    ``[r, w, a, b, c]`` of the reshape is element ``k = 4a + 2b + c``; split peels c, b, a."""
    c0, c1 = tl.split(tl.reshape(q.to(tl.uint32), [ROWS, W, 2, 2, 2]))
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    e0, e4 = tl.split(b00)
    e2, e6 = tl.split(b01)
    e1, e5 = tl.split(b10)
    e3, e7 = tl.split(b11)
    wd = ((e0 << 4) | e1 | (e2 << 12) | (e3 << 8) | (e4 << 20) | (e5 << 16) | (e6 << 28)
          | (e7 << 24))
    return wd.to(tl.int32, bitcast=True)


@triton.jit
def _quant4_kernel(x_ptr, dst_ptr, absmax_ptr, thr_ptr, codes_ptr, n, nunits, nblocks,
                   BS: tl.constexpr, ROWS: tl.constexpr, PACK: tl.constexpr,
                   CODING: tl.constexpr, C3: tl.constexpr, C2: tl.constexpr, C1: tl.constexpr,
                   C0: tl.constexpr):
    """PACK 0: uint8 bytes (``nunits`` bytes); 1: int32 words (``nunits`` words, written
    through ``dst_ptr`` cast to int32: no view op on the host); 2: words, one per thread.
    CODING (tables in quant4bit_tables.py): 1 (``poly_table``, NF4) the count guessed by the
    cubic ``C3..C0`` and one threshold; 0 (``cell_tables``, FP4) cells of ``round(16 |s|)``
    split by sign, two gathers.
    Compiled with FP fusion (the cubic in three FMAs): no result depends on it (the guess has a
    margin; ``16 |s| + M`` is exact before its one rounding; the normalisation is a lone
    product)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)                        # [ROWS] block ids
    idx = blk[:, None] * BS + tl.arange(0, BS)[None, :]          # [ROWS, BS]
    if (pid + 1) * ROWS * BS > n:                                # only the end masks per element
        x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + idx).to(tl.float32)
    # |x| >= 0 orders like its int32 bits, and a NaN's bits exceed inf's: the integer max is
    # the float max that propagates NaN (as torch's amax), at no extra cost
    am = tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1).to(tl.float32, bitcast=True)
    amc = tl.where(am < 1e-38, 1e-38, am)                        # bitsandbytes' floor
    # an all-zero block (x = +-0) scales by 0, never by 1 / 1e-38 (inf if the division
    # flushed the subnormal to zero, and 0 * inf = NaN)
    inv = tl.where(am > 0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amc), 0.0)
    tail = (blk + 1) * BS > n
    s = x * inv[:, None]
    if (pid + 1) * ROWS * BS > n:                                # ragged last block: divide
        s = tl.where(tail[:, None] & (am[:, None] > 0), tl.math.div_rn(x, amc[:, None]), s)
    # no clamp to [-1, 1]: every decision bound lies inside, so #(bounds < s) is unchanged
    # adding quant4bit_tables.MAGIC = 1.5 * 2**23 (float ulp 1 there; a literal here: Triton
    # reads no plain globals) rounds to an integer held in the low bits; the masks keep any
    # float (NaN: its block raises) inside the 32-entry tables
    if CODING == 1:
        # g = round(f(s)) is #(bounds < s) or one less; + 1 in the magic: g + 1 indexes t
        f = ((C3 * s + C2) * s + C1) * s + C0
        g1 = (f + 12582913.0).to(tl.int32, bitcast=True) & 31
        q = tl.where(s > tl.load(thr_ptr + g1), g1, g1 - 1)
    else:
        # the cell (``cell_np``): 16 |s| is exact, so it is rounded once
        c = (tl.minimum((tl.abs(s) * 16.0 + 12582912.0).to(tl.int32, bitcast=True) & 31, 15)
             + tl.where(s > 0, 16, 0))
        g = tl.load(codes_ptr + c).to(tl.int32)                  # lo | hi << 4
        q = tl.where(s > tl.load(thr_ptr + c), g >> 4, g & 15)
    if PACK == 0:
        ev, od = tl.split(tl.reshape(q, [ROWS, BS // 2, 2]))
        pidx = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
        tl.store(dst_ptr + pidx, ((ev << 4) | od).to(tl.uint8), mask=pidx < nunits)
    else:
        widx = blk[:, None] * (BS // 8) + tl.arange(0, BS // 8)[None, :]
        if PACK == 2:
            widx = tl.max_contiguous(widx, [1, 1])
        words_ptr = dst_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        tl.store(words_ptr + widx, _pack8(q, ROWS, BS // 8), mask=widx < nunits)
    tl.store(absmax_ptr + blk, tl.where(tail, amc, am), mask=blk < nblocks)


@triton.jit
def _copy_table(src_ptr, dst_ptr, pid, N: tl.constexpr):
    """Program 0 copies an N-entry table: the new QuantState's own copy without a clone launch."""
    if pid == 0:
        j = tl.arange(0, N)
        tl.store(dst_ptr + j, tl.load(src_ptr + j))


@triton.jit
def _quant8_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, lut_ptr, offset_ptr, code_out_ptr,
                   code4_ptr, code4_out_ptr, n, nblocks, BS: tl.constexpr, BSP: tl.constexpr,
                   ROWS: tl.constexpr, LUT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                   COPY_CODE: tl.constexpr, COPY_CODE4: tl.constexpr):
    """COPY_CODE / COPY_CODE4: program 0 also copies the 8-bit map / the 4-bit table (double
    quantization: the new state's own tables, written by the launch that follows the 4-bit one)."""
    pid = tl.program_id(0).to(tl.int64)
    if COPY_CODE:
        _copy_table(code_ptr, code_out_ptr, pid, 256)
    if COPY_CODE4:
        _copy_table(code4_ptr, code4_out_ptr, pid, 16)
    blk = pid * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BSP)
    idx = blk[:, None] * BS + col[None, :]
    m = (idx < n) & (col[None, :] < BS)
    x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
    if HAS_OFFSET:  # quantize x - offset (double quantization), one float32 subtraction
        x = tl.where(m, x - tl.load(offset_ptr), 0.0)
    am = tl.max(tl.abs(x), axis=1)
    if LUT:
        # bitsandbytes 0.50.2 CPU: index of grid point trunc(((s+1)*0.5)*65535+0.5) in a table
        inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.where(am > 0, am, 1.0))
        s = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
        j = (((s + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
        q = tl.load(lut_ptr + j, mask=m, other=0).to(tl.int32)
        q = tl.where(am[:, None] > 0, q, 0)
        am_out = am
    else:
        amc = tl.where(am < 1e-38, 1e-38, am)
        inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amc)
        tail = (blk + 1) * BS > n
        s = x * inv[:, None]
        if (pid + 1) * ROWS * BS > n:
            s = tl.where(tail[:, None], tl.math.div_rn(x, amc[:, None]), s)
        s = tl.where(am[:, None] > 0, s, 0.0)
        s = tl.minimum(tl.maximum(s, -1.0), 1.0)
        q = tl.zeros([ROWS, BSP], dtype=tl.int32)
        for k in tl.static_range(8):  # #(bounds < s), bound j = (code[j] + code[j+1]) / 2
            cand = q + (128 >> k)
            lo = tl.load(code_ptr + cand - 1, mask=m, other=0.0)
            hi = tl.load(code_ptr + cand, mask=m, other=0.0)
            q = tl.where(m & (s > (lo + hi) * 0.5), cand, q)
        am_out = tl.where(tail, amc, am)
    tl.store(codes_ptr + idx, q.to(tl.uint8), mask=m)
    tl.store(absmax_ptr + blk, am_out, mask=blk < nblocks)


@triton.jit
def _dequant8_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, BS,
                     BLOCK: tl.constexpr, OUT: tl.constexpr, RNE_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    q = tl.load(codes_ptr + idx, mask=m, other=0).to(tl.int32)
    v = tl.load(code_ptr + q) * tl.load(absmax_ptr + idx // BS, mask=m, other=0.0)
    _store_out(out_ptr, idx, v, m, OUT, RNE_BITS)


# ---- launches: every variant of one op takes the same arguments ----------------------------
def _dq4_bytes(packed, absmax, code, absmax2, code2, offset, out, n, nblocks,
               ELEMS, BS, BS2, NESTED, OUT, RNE_BITS, **kw):
    nbytes = (n + 1) // 2
    cols = min(BS // 2, _COLS_MAX)
    rows = max(1, ELEMS // (2 * cols))
    grid = (_cdiv(_cdiv(nbytes, cols), rows),)
    launch(_dequant4_kernel, grid, packed, absmax, code, absmax2, code2, offset, out, n, nbytes,
           nblocks, BS=BS, BS2=BS2, ROWS=rows, COLS=cols, NESTED=NESTED, OUT=OUT,
           RNE_BITS=RNE_BITS, enable_fp_fusion=False, **kw)


def _dq4_tile(packed, absmax, code, absmax2, code2, offset, out, n, nblocks,
              ELEMS, BS, BS2, NESTED, OUT, RNE_BITS, ONE_WORD, **kw):
    nwords = n // 8                                              # eligible: n % 8 == 0
    words = ELEMS // 8
    launch(_dequant4t_kernel, (_cdiv(nwords, words),),
           packed, absmax, code, absmax2, code2, offset, out, nwords,
           BS=BS, BS2=BS2, WORDS=words, NESTED=NESTED, OUT=OUT, RNE_BITS=RNE_BITS,
           ONE_WORD=ONE_WORD, enable_fp_fusion=False, **kw)


def _q4_launch(x, packed, absmax, tables, n, nblocks, ELEMS, BS, PACK, **kw):
    nbytes = (n + 1) // 2                      # words (PACK > 0): nbytes % 4 == 0, packed fresh
    rows = max(1, ELEMS // BS)
    coding, thr, codes, (c3, c2, c1, c0) = tables
    launch(_quant4_kernel, (_cdiv(nblocks, rows),),
           x, packed, absmax, thr, codes, n, nbytes // 4 if PACK else nbytes, nblocks, BS=BS,
           ROWS=rows, PACK=PACK, CODING=coding, C3=c3, C2=c2, C1=c1, C0=c0,
           enable_fp_fusion=True, enable_reflect_ftz=False, **kw)


# ---- tuner --------------------------------------------------------------------------------
# (elements, warps); on the H200 (Triton 3.6) 2048-4096 x 4 won all but one key timed (8192 x 8:
# bytes dequantize of 4096x4096 without double quant, logs/h200_bench_quant_s12.log)
_SIZES = ((2048, 4), (4096, 4), (8192, 8))
_TUNE_MIN = 1 << 20  # smaller tensors take the first eligible candidate, untimed


def _candidates(variants) -> List[Candidate]:
    return [Candidate(name, launch, consts, e, w) for name, launch, consts in variants
            for e, w in _SIZES]


_dequant4 = Tuned("dequant", _candidates([("tile1", _dq4_tile, dict(ONE_WORD=True)),
                                           ("tile", _dq4_tile, dict(ONE_WORD=False)),
                                           ("bytes", _dq4_bytes, {})]))
_quant4 = Tuned("quant", _candidates([("words", _q4_launch, dict(PACK=1)),
                                       ("words1", _q4_launch, dict(PACK=2)),
                                       ("bytes", _q4_launch, dict(PACK=0))]))
_TUNERS = {"dequant": _dequant4, "quant": _quant4}
# eligibility by alignment; each op only ever picks among its own candidates (``_VARIANTS``)
_ALL = ("words", "words1", "bytes", "tile", "tile1")
_BYTES = ("bytes",)  # any n
_VARIANTS = {op: tuple(dict.fromkeys(c.variant for c in t.candidates)) for op, t in _TUNERS.items()}


def last_choice(op: str) -> Optional[str]:
    """What the last ``op`` call ("quant" / "dequant") ran: ``"<variant> ELEMS=<e> warps=<w>"``."""
    return _TUNERS[op].last


def tuner_choices() -> Dict[str, Dict[tuple, str]]:
    """Per op, the tuned winner of every key timed so far (CUDA only)."""
    return {op: {k[:-1]: c.describe() for k, c in t.best.items() if k[-1]}  # k[-1]: timed
            for op, t in _TUNERS.items()}


@contextmanager
def forced_variant(op: str, variant: str, elems: Optional[int] = None,
                   num_warps: Optional[int] = None):
    """Run ``op`` with ``variant`` (where eligible; else the first eligible, untimed)."""
    if op not in _TUNERS:
        raise ValueError(f"unknown 4-bit kernel op {op!r}; one of {tuple(_TUNERS)}")
    if variant not in _VARIANTS[op]:
        raise ValueError(f"unknown 4-bit {op} kernel variant {variant!r}; one of {_VARIANTS[op]}")
    tuner = _TUNERS[op]
    saved, tuner.force = tuner.force, (variant, elems, num_warps)
    try:
        yield
    finally:
        tuner.force = saved


_coding_force: Optional[str] = None


@contextmanager
def forced_coding(coding: Optional[str]):
    """Quantize with the coding step ``coding`` (one of ``CODINGS``, None: the default; tests
    and probes)."""
    global _coding_force
    if coding is not None and coding not in CODINGS:
        raise ValueError(f"unknown coding {coding!r}; one of {CODINGS}")
    saved, _coding_force = _coding_force, coding
    try:
        yield
    finally:
        _coding_force = saved


def _size_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _word_aligned(t: torch.Tensor) -> bool:
    return t.storage_offset() % 4 == 0 and t.data_ptr() % 4 == 0


CODINGS = ("cells", "poly")   # the kernel's CODING values, by name


@lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device, coding: Optional[str] = None):
    """The coding step's launch arguments ``(CODING, thr, codes, (C3, C2, C1, C0))`` on
    ``device`` (cached; never handed out). By default NF4 takes the count guess (``poly``),
    FP4 the cells; ``coding`` forces one (probes and tests; ValueError where the code has no
    such table). Session 15 also tried for FP4 one gather per weight: sign-folded magnitude
    cells read from the float's bits (``(max(bits |s|, c) >> 22) & 31``, an int32 entry packing
    the bound's low 22 bits and both codes, compared as unsigned integers with a tie bit for
    s <= 0; exact on all 2.13e9 floats of [-1.0001, 1.0001]); on the H200 it took 105.8 us
    against the cells' 81.7 us at 4096x14336 (``results/logs/h200_quant_coding_paths_s15.log``)
    with one gather and 1.5 more integer instructions per weight (SASS), and was removed."""
    poly = poly_table(quant_type) if coding in (None, "poly") else None
    if poly is not None:
        thr = poly[1].to(device)
        return 1, thr, thr, poly[0]            # the guess reads no codes table
    if coding not in (None, "cells"):
        raise ValueError(f"{quant_type} has no {coding!r} coding table; one of {CODINGS}")
    thr, codes = cell_tables(quant_type)
    return 0, thr.to(device), codes.to(device), (0.0,) * 4


@lru_cache(maxsize=None)
def _code_on(name: str, device: torch.device) -> torch.Tensor:
    """A table on ``device`` (cached, never handed out: the kernels copy it into each new
    state's own tensor, other callers clone it)."""
    return dynamic_map(True, device=device) if name == "dynamic" else get_code(name, device)


@lru_cache(maxsize=None)
def _dynamic_lut_on(device: torch.device) -> torch.Tensor:
    return lut_table(_code_on("dynamic", device))


def _quant8(flat, code, lut, blocksize, rounding, offset=None, code_out=None, code4=None):
    """Launch the 8-bit kernel on flat ``flat`` (minus ``offset`` when given) -> flat codes;
    ``code_out`` (256 float32) receives a copy of ``code`` (the new state's own table), and
    ``code4 = (table, out)`` a copy of the 4-bit table."""
    n = flat.numel()
    nblocks = num_blocks(n, blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    bsp = 1 << (blocksize - 1).bit_length()
    rows = max(1, 4096 // bsp)
    src4, out4 = code4 or (code, code)        # unused pointers when there is nothing to copy
    launch(_quant8_kernel, (_cdiv(nblocks, rows),),
           flat, codes, absmax, code, codes if lut is None else lut,
           absmax if offset is None else offset, code if code_out is None else code_out,
           src4, out4, n, nblocks, BS=blocksize, BSP=bsp, ROWS=rows, LUT=rounding == "lut",
           HAS_OFFSET=offset is not None, COPY_CODE=code_out is not None,
           COPY_CODE4=code4 is not None, enable_fp_fusion=False, enable_reflect_ftz=False,
           num_warps=4)
    return codes, absmax


def _quant8_minus_offset(absmax, code2, blocksize, rounding, offset, code4=None):
    """build_state's fused hook: 8-bit codes of ``absmax - offset`` by the dynamic map; ``code2``
    is the new state's table, allocated empty: the kernel writes the map's copy into it (and
    the 4-bit table's into ``code4[1]`` when given)."""
    dev = absmax.device
    lut = _dynamic_lut_on(dev) if rounding == "lut" else None
    return _quant8(absmax, _code_on("dynamic", dev), lut, blocksize, rounding, offset, code2,
                   code4)


# ---- public entry points ------------------------------------------------------------------
_REPLAY = True        # probes switch it off to measure what the replay saves


def _launch_quant4(key, eligible, tune: bool, x, packed, absmax, n: int, nblocks: int) -> None:
    """The tuned 4-bit quantize launch. Once a key's candidate is known, the first launch is
    recorded (``launch.record``) and later calls with the same candidate, size, dtype,
    16-byte alignments, device and coding replay it: no tuner, no argument keys, the launcher
    called with five fresh pointers (the host time before the kernel starts is the call's
    critical path at the middle sizes). ``launch.clear_cache`` forgets the replays."""
    blocksize, quant_type = key[0], key[3]
    tables = _tables(quant_type, x.device, _coding_force)
    fast = _REPLAY and _launch_mod._FAST and not _quant4.force
    cand = _quant4.best.get((*key, tune)) if fast else None
    if cand is None:                        # tuning, forced, interpreted or switched off
        _quant4(key, eligible, tune, x, packed, absmax, tables, n, nblocks, BS=blocksize)
        return
    # candidates live as long as the tuner: their identity stands for them (they hold a dict);
    # the tables are the same cached tensors for one (quant_type, device, coding)
    rkey = ("quant4", id(cand), key, n, x.data_ptr() & 15 == 0,
            (packed.data_ptr() | absmax.data_ptr()) & 15 == 0, x.get_device(), _coding_force)
    replay = _launch_mod.replays.get(rkey)
    if replay is not None and replay(x, packed, absmax, tables[1], tables[2]):
        _quant4._last = (cand, None, "" if tune else _UNTIMED)
        return
    with record() as launched:
        _quant4(key, eligible, tune, x, packed, absmax, tables, n, nblocks, BS=blocksize)
    if len(launched) == 1:
        if len(_launch_mod.replays) >= 256:
            _launch_mod.replays.clear()
        _launch_mod.replays[rkey] = launched[0]


def quantize_4bit_triton(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                         double_quant: bool = True, nested_rounding: str = "nearest"):
    """Kernel twin of ``quantize_4bit_reference``: ``(packed uint8 [(n+1)//2, 1], QuantState)``."""
    check_quantize_args(w, blocksize, quant_type, nested_rounding)
    x = w if w.is_contiguous() else w.contiguous()   # read flat by the kernel (no view ops:
    n, dev = x.numel(), x.device                      # a few us each on the host)
    nblocks, nbytes = num_blocks(n, blocksize), (n + 1) // 2
    packed = torch.empty((nbytes, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=dev)
    eligible = _ALL if nbytes % 4 == 0 else _BYTES
    _launch_quant4((blocksize, _size_bucket(n), x.dtype, quant_type, eligible), eligible,
                   n >= _TUNE_MIN, x, packed, absmax, n, nblocks)
    # launched first: the rest of the host work overlaps the 4-bit kernel. The state owns its
    # tables: the 8-bit kernel copies both from device-cached ones (no host-to-device copy,
    # which would wait for the kernels); reading the mean back (or the scan) is the one sync
    code4 = _code_on(quant_type, dev)
    if double_quant:
        code = torch.empty(16, dtype=torch.float32, device=dev)
        code2 = torch.empty(256, dtype=torch.float32, device=dev)

        def quantize8(a, c2, bs, rounding, offset):
            return _quant8_minus_offset(a, c2, bs, rounding, offset, (code4, code))
    else:
        code, code2, quantize8 = code4.clone(), None, _quant8_minus_offset
    state = build_state(absmax, w, blocksize, quant_type, double_quant, nested_rounding,
                        quantize8=quantize8, fused_offset=True, code=code, code2=code2)
    check_finite_absmax(absmax, mean=state.offset if double_quant else None)
    return packed, state


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Kernel twin of ``dequantize_4bit_reference`` -> tensor of ``state.shape``."""
    out_dtype = check_dequantize_args(packed, state, out_dtype)
    n = state.numel
    out = torch.empty(state.shape, dtype=out_dtype, device=packed.device)
    nested = state.nested
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.absmax
    bs2 = state.state2.blocksize if nested else 1
    flat = packed.contiguous().view(-1)
    eligible = _ALL if n % 8 == 0 and _word_aligned(flat) else _BYTES
    _dequant4((state.blocksize, _size_bucket(n), out_dtype, nested, eligible), eligible,
              n >= _TUNE_MIN, flat, state.absmax.contiguous(), state.code.contiguous(),
              absmax2.contiguous(), code2.contiguous(), offset, out, n, state.absmax.numel(),
              BS=state.blocksize, BS2=bs2, NESTED=nested, OUT=_OUT_KIND[out_dtype],
              RNE_BITS=_interpreting(packed))
    return out


def quantize_blockwise_8bit_triton(x: torch.Tensor, code: Optional[torch.Tensor] = None,
                                   blocksize: int = 256, rounding: str = "nearest"):
    """Kernel twin of ``quantize_blockwise_8bit_reference`` -> ``(uint8 like x, absmax f32)``."""
    code = check_quantize8_args(x, code, blocksize, rounding)
    code = _code_on("dynamic", x.device) if code is None else code
    lut = lut_table(code) if rounding == "lut" else None
    codes, absmax = _quant8(x.detach().contiguous().view(-1), code.contiguous(), lut, blocksize,
                            rounding)
    return codes.view(x.shape), absmax


def dequantize_blockwise_8bit_triton(codes: torch.Tensor, absmax: torch.Tensor,
                                     code: Optional[torch.Tensor] = None, blocksize: int = 256,
                                     shape=None, dtype: torch.dtype = torch.float32):
    """Kernel twin of ``dequantize_blockwise_8bit_reference``."""
    code, shape, n = _check_dequant_args(codes, absmax, code, blocksize, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    block = 1024 if _interpreting(codes) else 4096
    launch(_dequant8_kernel, (_cdiv(n, block),),
           codes.contiguous().view(-1), absmax.float(), code, out, n, blocksize, BLOCK=block,
           OUT=_OUT_KIND[dtype], RNE_BITS=_interpreting(codes), num_warps=4)
    return out
