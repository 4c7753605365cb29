"""Triton kernels for 4-bit NF4/FP4 quantize/dequantize with double quantization (QLoRA).

The math is in ``peftlab/quant/functional.py`` (QLoRA, arXiv 2305.14314, section 3, eq. 1-6):
per block of ``B`` elements ``absmax_b = max |W_i|``, ``q_i = nearest level of W_i / absmax_b``,
two 4-bit indices per byte (first element high), and double quantization of the absmax
constants with the 8-bit dynamic map in blocks of 256 (``peftlab/quant/blockwise8.py``). These
kernels are bit-exact twins of those references (tested interpreted on the CPU and on CUDA).

Design (the GPU goal is bandwidth: dequantize moves 0.5 B in and 2 B out per bf16 weight):

* ``_dequant4_kernel``: a program owns a ``[ROWS, COLS]`` tile of packed bytes (COLS divides
  ``B / 2`` so a tile row lies inside one quantization block) and writes ``[ROWS, 2 COLS]``
  outputs: contiguous 16-byte vector loads and stores, one pass, no intermediate absmax tensor.
  Nibbles are split with shifts, interleaved (``tl.interleave``: the high nibble is the even
  element), looked up in the 16-entry code table (a gather that stays in L1), scaled by the
  row's absmax. Double-quantized absmax is decoded in-kernel per row:
  ``code2[qa_b] * absmax2[b // 256] + offset`` (compiled with ``enable_fp_fusion=False`` so the
  multiply and add round separately, as in the PyTorch reference).
* ``_quant4_kernel``: a program owns ``ROWS`` whole blocks ``[ROWS, B]``: absmax by a row
  reduction, normalisation by the correctly rounded reciprocal (``div_rn``; Triton's ``/`` is
  approximate on GPUs; the ragged last block divides, as the reference, and only the program
  holding it pays for the division), nearest level by a 4-level branch-free binary search over the 15
  decision bounds (``#(bounds < s)``, ties to the lower level), FP4's sorted-position-to-index
  map by a 16-entry gather, nibble packing with ``tl.split``.
* ``_quant8_kernel`` / ``_dequant8_kernel``: blockwise 8-bit with a 256-entry code (nearest by
  an 8-step binary search over 255 bounds, or bitsandbytes' CPU 65536-entry lookup table); used
  for double quantization and exposed for the 8-bit optimizer.

Rounding traps handled: bf16 output is rounded to nearest even by bit arithmetic when running
under ``TRITON_INTERPRET=1`` (whose float32->bfloat16 cast truncates); on the GPU the native
cast already rounds to nearest even. float16 casts round to nearest even in both places.

On CUDA the 4-bit kernels pick one of four tile configurations (elements per program x warps)
by timing them with ``do_bench`` on first use per (blocksize, size bucket, dtype) — a tiny
tuner rather than ``triton.autotune`` because the tile shape is derived from the blocksize; the
interpreter uses one small fixed tile. Entry points have the contracts of the references:
``quantize_4bit_triton``, ``dequantize_4bit_triton``, ``quantize_blockwise_8bit_triton``,
``dequantize_blockwise_8bit_triton``.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.testing
import triton.language as tl

from peftlab.quant.blockwise8 import (_check_dequant_args, check_quantize8_args, lut_table,
                                      num_blocks)
from peftlab.quant.codes import decision_bounds, dynamic_map, get_code
from peftlab.quant.functional import (build_state, check_dequantize_args, check_finite_absmax,
                                      check_quantize_args)
from peftlab.quant.state import QuantState

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_COLS_MAX = 64  # packed bytes per dequant tile row (128 outputs)


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
    blk = (row * (2 * COLS)) // BS                               # block of each row
    bmask = blk < nblocks
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        am = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // BS2, mask=bmask, other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    eidx = row[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    _store_out(out_ptr, eidx, vals * am[:, None], eidx < n, OUT, RNE_BITS)


@triton.jit
def _nearest16(s, bounds_ptr):
    """``#(bounds < s)`` for 15 ascending bounds: four compare levels, thresholds by selects."""
    b0 = tl.load(bounds_ptr + 0)
    b1 = tl.load(bounds_ptr + 1)
    b2 = tl.load(bounds_ptr + 2)
    b3 = tl.load(bounds_ptr + 3)
    b4 = tl.load(bounds_ptr + 4)
    b5 = tl.load(bounds_ptr + 5)
    b6 = tl.load(bounds_ptr + 6)
    b7 = tl.load(bounds_ptr + 7)
    b8 = tl.load(bounds_ptr + 8)
    b9 = tl.load(bounds_ptr + 9)
    b10 = tl.load(bounds_ptr + 10)
    b11 = tl.load(bounds_ptr + 11)
    b12 = tl.load(bounds_ptr + 12)
    b13 = tl.load(bounds_ptr + 13)
    b14 = tl.load(bounds_ptr + 14)
    g1 = s > b7
    g2 = s > tl.where(g1, b11, b3)
    g3 = s > tl.where(g1, tl.where(g2, b13, b9), tl.where(g2, b5, b1))
    t4 = tl.where(g1, tl.where(g2, tl.where(g3, b14, b12), tl.where(g3, b10, b8)),
                  tl.where(g2, tl.where(g3, b6, b4), tl.where(g3, b2, b0)))
    g4 = s > t4
    return g1.to(tl.int32) * 8 + g2.to(tl.int32) * 4 + g3.to(tl.int32) * 2 + g4.to(tl.int32)


@triton.jit
def _quant4_kernel(x_ptr, packed_ptr, absmax_ptr, bounds_ptr, order_ptr, n, nbytes, nblocks,
                   BS: tl.constexpr, ROWS: tl.constexpr, HAS_ORDER: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)                        # [ROWS] block ids
    idx = blk[:, None] * BS + tl.arange(0, BS)[None, :]          # [ROWS, BS]
    x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)
    amc = tl.where(am < 1e-38, 1e-38, am)                        # bitsandbytes' floor
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amc)
    tail = (blk + 1) * BS > n
    s = x * inv[:, None]
    if (pid + 1) * ROWS * BS > n:                                # ragged last block: divide
        s = tl.where(tail[:, None], tl.math.div_rn(x, amc[:, None]), s)
    s = tl.where(am[:, None] > 0, s, 0.0)
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    q = _nearest16(s, bounds_ptr)
    if HAS_ORDER:
        q = tl.load(order_ptr + q)
    ev, od = tl.split(tl.reshape(q, [ROWS, BS // 2, 2]))
    byte = ((ev << 4) | od).to(tl.uint8)
    pidx = blk[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + pidx, byte, mask=pidx < nbytes)
    tl.store(absmax_ptr + blk, tl.where(tail, amc, am), mask=blk < nblocks)


@triton.jit
def _quant8_kernel(x_ptr, codes_ptr, absmax_ptr, code_ptr, lut_ptr, n, nblocks,
                   BS: tl.constexpr, BSP: tl.constexpr, ROWS: tl.constexpr, LUT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BSP)
    idx = blk[:, None] * BS + col[None, :]
    m = (idx < n) & (col[None, :] < BS)
    x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
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


# ---- launch configuration -----------------------------------------------------------------
_TILE_CONFIGS = [triton.Config({"ELEMS": e}, num_warps=w)
                 for e, w in ((4096, 4), (8192, 4), (8192, 8), (16384, 8))]


def _dq4_launch(packed, absmax, code, absmax2, code2, offset, out, n, nbytes, nblocks,
                ELEMS, BS, BS2, NESTED, OUT, RNE_BITS, **kw):
    cols = min(BS // 2, _COLS_MAX)
    rows = max(1, ELEMS // (2 * cols))
    grid = (triton.cdiv(triton.cdiv(nbytes, cols), rows),)
    _dequant4_kernel[grid](packed, absmax, code, absmax2, code2, offset, out, n, nbytes, nblocks,
                           BS=BS, BS2=BS2, ROWS=rows, COLS=cols, NESTED=NESTED, OUT=OUT,
                           RNE_BITS=RNE_BITS, enable_fp_fusion=False, **kw)


def _q4_launch(x, packed, absmax, bounds, order, n, nbytes, nblocks, ELEMS, BS, HAS_ORDER, **kw):
    rows = max(1, ELEMS // BS)
    grid = (triton.cdiv(nblocks, rows),)
    _quant4_kernel[grid](x, packed, absmax, bounds, order, n, nbytes, nblocks, BS=BS, ROWS=rows,
                         HAS_ORDER=HAS_ORDER, enable_fp_fusion=False, **kw)


class _Tuned:
    """Pick the fastest tile config per key on CUDA (timed once with do_bench); the interpreter
    always uses the first. Outputs are rewritten by every trial, so tuning is side-effect free."""

    def __init__(self, launch, configs, interp_elems=1024):
        self.launch, self.configs, self.interp_elems, self.best = launch, configs, interp_elems, {}

    def __call__(self, key, *args, **kwargs):
        if _interpreting(args[0]):
            return self.launch(*args, ELEMS=self.interp_elems, **kwargs)
        if key not in self.best:
            times = []
            for cfg in self.configs:
                def run(cfg=cfg):
                    self.launch(*args, **cfg.kwargs, num_warps=cfg.num_warps, **kwargs)
                times.append(triton.testing.do_bench(run, warmup=5, rep=20))
            self.best[key] = self.configs[min(range(len(times)), key=times.__getitem__)]
        cfg = self.best[key]
        return self.launch(*args, **cfg.kwargs, num_warps=cfg.num_warps, **kwargs)


_dequant4 = _Tuned(_dq4_launch, _TILE_CONFIGS)
_quant4 = _Tuned(_q4_launch, _TILE_CONFIGS)


def _interpreting(t: torch.Tensor) -> bool:
    return (not t.is_cuda) or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _size_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device):
    """Decision bounds and FP4 order table on ``device`` (cached; never handed out)."""
    bounds, order = decision_bounds(get_code(quant_type))
    return bounds.to(device), order.to(torch.int32).to(device)


@lru_cache(maxsize=None)
def _code_on(name: str, device: torch.device) -> torch.Tensor:
    """A table on ``device`` (cached; callers clone before handing it out)."""
    return dynamic_map(True, device=device) if name == "dynamic" else get_code(name, device)


# ---- public entry points ------------------------------------------------------------------
def quantize_4bit_triton(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                         double_quant: bool = True, nested_rounding: str = "nearest"):
    """Kernel twin of ``quantize_4bit_reference``: ``(packed uint8 [(n+1)//2, 1], QuantState)``."""
    check_quantize_args(w, blocksize, quant_type, nested_rounding)
    x = w.detach().contiguous().view(-1)
    n = x.numel()
    nblocks, nbytes = num_blocks(n, blocksize), (n + 1) // 2
    packed = torch.empty((nbytes, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    bounds, order = _tables(quant_type, x.device)
    _quant4((blocksize, _size_bucket(n), x.dtype, quant_type), x, packed, absmax, bounds, order,
            n, nbytes, nblocks, BS=blocksize, HAS_ORDER=quant_type != "nf4")
    # device-cached tables (cloned: the state owns them) avoid host-to-device copies, which
    # would wait for the kernel; the finite check after all launches is the one sync
    state = build_state(absmax, w, blocksize, quant_type, double_quant, nested_rounding,
                        quantize8=quantize_blockwise_8bit_triton,
                        code=_code_on(quant_type, x.device).clone(),
                        code2=_code_on("dynamic", x.device).clone() if double_quant else None)
    check_finite_absmax(absmax)
    return packed, state


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Kernel twin of ``dequantize_4bit_reference`` -> tensor of ``state.shape``."""
    out_dtype = check_dequantize_args(packed, state, out_dtype)
    n = state.numel
    out = torch.empty(state.shape, dtype=out_dtype, device=packed.device)
    nblocks = state.absmax.numel()
    nested = state.nested
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.absmax
    bs2 = state.state2.blocksize if nested else 1
    _dequant4((state.blocksize, _size_bucket(n), out_dtype, nested), packed.contiguous(),
              state.absmax.contiguous(), state.code.contiguous(), absmax2.contiguous(),
              code2.contiguous(), offset, out, n, (n + 1) // 2, nblocks,
              BS=state.blocksize, BS2=bs2, NESTED=nested, OUT=_OUT_KIND[out_dtype],
              RNE_BITS=_interpreting(packed))
    return out


def quantize_blockwise_8bit_triton(x: torch.Tensor, code: Optional[torch.Tensor] = None,
                                   blocksize: int = 256, rounding: str = "nearest"):
    """Kernel twin of ``quantize_blockwise_8bit_reference`` -> ``(uint8 like x, absmax f32)``."""
    code = check_quantize8_args(x, code, blocksize, rounding)
    code = _code_on("dynamic", x.device) if code is None else code
    flat = x.detach().contiguous().view(-1)
    n = flat.numel()
    nblocks = num_blocks(n, blocksize)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    bsp = triton.next_power_of_2(blocksize)
    rows = max(1, 4096 // bsp)
    lut = lut_table(code) if rounding == "lut" else codes
    _quant8_kernel[(triton.cdiv(nblocks, rows),)](
        flat, codes, absmax, code.contiguous(), lut, n, nblocks, BS=blocksize, BSP=bsp, ROWS=rows,
        LUT=rounding == "lut", enable_fp_fusion=False, num_warps=4)
    return codes, absmax


def dequantize_blockwise_8bit_triton(codes: torch.Tensor, absmax: torch.Tensor,
                                     code: Optional[torch.Tensor] = None, blocksize: int = 256,
                                     shape=None, dtype: torch.dtype = torch.float32):
    """Kernel twin of ``dequantize_blockwise_8bit_reference``."""
    code, shape, n = _check_dequant_args(codes, absmax, code, blocksize, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    block = 1024 if _interpreting(codes) else 4096
    _dequant8_kernel[(triton.cdiv(n, block),)](
        codes.contiguous().view(-1), absmax.float(), code, out, n, blocksize, BLOCK=block,
        OUT=_OUT_KIND[dtype], RNE_BITS=_interpreting(codes), num_warps=4)
    return out
