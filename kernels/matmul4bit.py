"""The 4-bit linear op: ``y = x @ dequant(W)^T + b`` with a fused Triton kernel and its backward.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3, eq. 5) computes a frozen 4-bit linear
layer as ``Y = X · doubleDequant(c1, c2, W_4bit)^T``. ``matmul_4bit(x, packed, state, bias)``
does that for ``x [..., K]``, ``W [N, K]`` stored as ``packed`` uint8 ``[(N*K+1)//2, 1]`` with a
``peftlab.quant.QuantState`` (NF4 or FP4, with or without double quantization); the result
``[..., N]`` is in x's dtype (the compute dtype: bfloat16, float16 or float32).

Dispatch: on CUDA the Triton kernels (the weight is decoded inside the kernel; the
full-precision W never exists in memory). For M = prod(x.shape[:-1]) <= ``MMA_MAX_M`` (16), bf16
or fp16 x, K and the blocksize multiples of 64: the mma.sync kernel of ``matmul4bit_mma.py``
(each lane decodes its own tensor-core fragments; tile picked by timing graph replays once per
shape). Otherwise the tiled tensor-core GEMM of ``matmul4bit_kernels.py``, split-K when M is
small. Both use the PRMT decoder of ``decode4bit.py`` once it has passed its on-device check
(``decoder="table"`` or ``PEFTLAB_4BIT_DECODER=table`` forces the portable decoder and with it
the tiled kernel; ``PEFTLAB_4BIT_MMA=0`` turns the mma kernel off). Elsewhere the reference twin:
``dequantize_4bit`` to x's dtype, then ``F.linear``. ``impl="triton"`` forces the kernels (tests
run the tiled ones on the CPU under ``TRITON_INTERPRET=1``), ``impl="reference"`` the PyTorch
path. A CUDA-core GEMV (``_mm4_gemv_kernel``, tile picked by timing) is opt-in for M <=
``GEMV_MAX_M`` (0 by default: it lost to the split-K tensor-core kernel in every measured case)
or a 5-tuple ``config``; ``config=("mma", *MmaTile(...))`` pins the mma kernel's launch.

Backward (``Matmul4bitFunction``), with ``W = dequant(packed)`` a constant, ``g = dL/dy``:

    y[m, n]   = sum_k x[m, k] W[n, k] + b[n]
    dL/dx[m, k] = sum_n g[m, n] * dy[m, n]/dx[m, k] = sum_n g[m, n] W[n, k]
                  ->  grad_x = g @ W               [M, K], the same fused decode, reduced over N
    dL/db[n]  = sum_m g[m, n]                      ->  grad_b = g.sum(rows)   (if b needs grad)
    dL/dW     = none: the weight is frozen (4-bit storage has no gradient)

Forward saves only ``packed`` and the state (never a dequantized W); backward decodes again.
The raw-tensor entry points ``matmul4bit_forward`` / ``matmul4bit_backward_input`` take the
packed bytes, code table, absmax (float32, or uint8 + absmax2 + code2 + offset when nested),
blocksize and [N, K] directly.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.testing

from peftlab.errors import QuantError
from peftlab.quant.functional import dequantize_4bit, dequantize_4bit_reference
from peftlab.quant.state import QuantState

from .decode4bit import prmt_decoder_ok
from .matmul4bit_kernels import (_BWD_BUCKETS, _FWD_BUCKETS, _bucket_configs, _mm4_bwd_kernel,
                                 _mm4_bwd_tuned, _mm4_fwd_kernel, _mm4_fwd_tuned, _mm4_gemv_kernel)
from .matmul4bit_common import (MAX_SPLIT, _cdiv, _counters, _interpreting, _m_bucket,
                                _num_sms, _tables, _workspace)
from .matmul4bit_mma import MmaTile, _mma, _mma_unfit
from .tuning import fastest

# Rows of x up to which the CUDA-core GEMV kernel runs (fast layout only). 0: never by default.
# Measured on the H200 (experiments/gemv_vs_dot.py, results/logs/h200_gemv_vs_dot.log): the
# split-K tensor-core kernel is faster at every M = 1..8 on every shape (M = 1: 132 vs 138 us on
# 28672x8192); the GEMV's cost grows with M (BM FMAs per decoded weight) while the MMA's is flat.
# The GEMV stays as a measured alternative: set GEMV_MAX_M, or pass a tuple ``config``.
GEMV_MAX_M = 0
# GEMV tiles: (BN rows of W, BK elements of K per step, warps, programs per SM wanted, prefetch);
# on CUDA the fastest per (M bucket, N, K, blocksize, nesting, dtype, decoder) is picked by timing
# More rows per tile means more rows per thread sharing one load and conversion of x.
GEMV_CONFIGS = [(8, 1024, 4, 8, False), (16, 512, 4, 8, True), (32, 512, 4, 8, False),
                (32, 512, 4, 8, True), (64, 256, 4, 8, False), (64, 512, 8, 8, False),
                (128, 256, 8, 4, False), (4, 2048, 4, 8, False)]
GEMV_TIMES: Dict[Tuple, list] = {}      # key -> [(config, ms)] of the timed choice
_GEMV_BEST: Dict[Tuple, tuple] = {}
# Rows of x up to which the hand-placed mma.sync kernel (``matmul4bit_mma.py``) runs on CUDA
# (bf16/fp16 x, K % 64 == 0, blocksize % 64 == 0, PRMT decoder verified); 0 turns it off, as does
# PEFTLAB_4BIT_MMA=0; it never takes more than 16 rows. Its tile: ``matmul4bit_mma.MMA_CONFIGS``.
MMA_MAX_M = 16


@contextmanager
def mma_off():
    """Within: calls that would take the mma.sync kernel take the tiled ``tl.dot`` one
    (benchmarks compare the two; ``MMA_MAX_M`` is restored on exit)."""
    global MMA_MAX_M
    keep, MMA_MAX_M = MMA_MAX_M, 0
    try:
        yield
    finally:
        MMA_MAX_M = keep


IMPLS = ("auto", "triton", "reference")
DECODERS = ("auto", "prmt", "table")
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dot_f32(x: torch.Tensor) -> bool:
    """The Triton 3.9 interpreter's tl.dot multiplies bf16 storage as integers, so there bf16
    tiles go to the dot in float32."""
    return x.dtype == torch.bfloat16 and _interpreting()


def _num_splits(tiles: int, steps: int, target: int, M: int, K: int) -> int:
    """Split-K factor: about ``target`` programs, >= 2 K steps each, <= MAX_SPLIT, and float32
    partials (8 bytes per output, written and read) at most the packed weight's K/2 bytes a row."""
    if tiles >= target or steps < 4:
        return 1
    s = min(-(-target // tiles), steps // 2, MAX_SPLIT, max(1, K // (16 * M)))
    per = -(-steps // s)
    return -(-steps // per)            # no empty split


def _decoder(decoder: str) -> str:
    """The decoder asked for: "auto", "prmt" or "table" (PEFTLAB_4BIT_DECODER fills in auto)."""
    if decoder not in DECODERS:
        raise QuantError(f"matmul_4bit: decoder {decoder!r} is not one of {DECODERS}")
    return os.environ.get("PEFTLAB_4BIT_DECODER", "auto") if decoder == "auto" else decoder


def _use_prmt(x: torch.Tensor, fast: bool, decoder: str) -> bool:
    decoder = _decoder(decoder)
    if decoder == "table" or not fast or not x.is_cuda or x.dtype == torch.float32:
        return False
    return prmt_decoder_ok(x.device, x.dtype)


def _launch(jit_fn, tuned_fn, grid, args, consts, config, interp_cfgs):
    """Autotuned launch on a GPU; a fixed config under the interpreter or when pinned."""
    if config is None and _interpreting():
        config = interp_cfgs[0]
    if config is None:
        tuned_fn[grid](*args, **consts)
        return
    if isinstance(config, dict):
        config = triton.Config({k: v for k, v in config.items()
                                if k not in ("num_warps", "num_stages", "maxnreg")},
                               num_warps=config.get("num_warps", 4),
                               num_stages=config.get("num_stages", 3),
                               maxnreg=config.get("maxnreg"))
    meta = dict(config.kwargs)
    extra = {} if config.maxnreg is None else {"maxnreg": config.maxnreg}
    jit_fn[grid(meta)](*args, **consts, **meta, num_warps=config.num_warps,
                       num_stages=config.num_stages, **extra)


def _meta(config) -> dict:
    return config if isinstance(config, dict) else config.kwargs


class _Quant:
    """The raw tensors of one 4-bit weight, checked and flattened for the kernels."""

    def __init__(self, packed, code, absmax, N, K, blocksize, absmax2, code2, offset, blocksize2):
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise QuantError(f"matmul_4bit: packed weight must be a uint8 tensor, got "
                             f"{getattr(packed, 'dtype', type(packed).__name__)}")
        if packed.numel() != (N * K + 1) // 2:
            raise QuantError(f"matmul_4bit: packed weight has {packed.numel()} bytes, weight "
                             f"[{N}, {K}] needs {(N * K + 1) // 2}")
        if blocksize < 2 or blocksize & (blocksize - 1):
            raise QuantError(f"matmul_4bit: blocksize {blocksize} is not a power of two >= 2")
        nb = -(-N * K // blocksize)
        self.nested = absmax.dtype == torch.uint8
        if absmax.numel() != nb or absmax.dtype not in (torch.float32, torch.uint8):
            raise QuantError(f"matmul_4bit: absmax has {absmax.numel()} values of {absmax.dtype},"
                             f" expected {nb} float32 (or uint8 with double quantization)")
        if code.numel() != 16:
            raise QuantError(f"matmul_4bit: code table has {code.numel()} entries, expected 16")
        if self.nested and (absmax2 is None or code2 is None or offset is None):
            raise QuantError("matmul_4bit: uint8 absmax needs absmax2, code2 and offset "
                             "(double quantization)")
        for t in (absmax, code):
            if t.device != packed.device:
                raise QuantError(f"matmul_4bit: packed weight on {packed.device} but quant "
                                 f"state on {t.device}")
        self.code = code
        self.absmax = absmax.reshape(-1).contiguous()
        self.N, self.K, self.bs = N, K, blocksize
        self.bs2 = blocksize2 if self.nested else 1
        if self.nested:
            self.am2 = absmax2.reshape(-1).float().contiguous()
            self.code2 = code2.reshape(-1).float().contiguous()
            self.off = offset.reshape(-1).float().contiguous()
        else:
            self.am2 = self.code2 = self.off = self.absmax
        # fast tiles: K steps inside one block per row, weight read as int32 words
        self.fast = K % blocksize == 0 and blocksize >= 32
        self.bk = min(64, blocksize) if self.fast else 64
        flat = packed.reshape(-1)
        if self.fast:
            if flat.data_ptr() % 16:
                flat = flat.clone()
            flat = flat.view(torch.int32)
        self.weight = flat

    def args(self, dtype: torch.dtype):
        """(weight, table, byte planes, absmax, absmax2, code2, offset) for the kernels."""
        table, tab = _tables(self.code, dtype)
        return (self.weight, table, tab, self.absmax, self.am2, self.code2, self.off)


def _as_2d(t: torch.Tensor, K: int, what: str) -> torch.Tensor:
    if t.dtype not in _X_DTYPES:
        raise QuantError(f"matmul_4bit: {what} dtype {t.dtype} is not float16, bfloat16 or "
                         f"float32")
    if t.shape[-1] != K:
        raise QuantError(f"matmul_4bit: {what} has last dimension {t.shape[-1]}, expected {K}")
    t = t.reshape(math.prod(t.shape[:-1]), K)
    return t if t.stride(-1) == 1 and t.stride(0) == K else t.contiguous()


def _operands(t, inner, cols, out, what):
    """(t as [M, inner], out [M, cols], M, nothing to compute); an empty reduction zeroes out."""
    t = _as_2d(t, inner, what)
    M = t.shape[0]
    out = _check_out(out, (M, cols), t.dtype, t.device)
    if M and cols and not inner:
        out.zero_()
    return t, out, M, not (M and cols and inner)


def _check_out(out, shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or (
            shape[0] > 0 and out.stride() != (shape[1], 1)):
        raise QuantError(f"matmul_4bit: out must be a contiguous {dtype} tensor of shape "
                         f"{list(shape)} on {device}, got {out.dtype} {list(out.shape)}")
    return out


def matmul4bit_forward(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor,
                       absmax: torch.Tensor, N: int, K: int, blocksize: int, *,
                       absmax2: Optional[torch.Tensor] = None, code2: Optional[torch.Tensor] = None,
                       offset: Optional[torch.Tensor] = None, blocksize2: int = 256,
                       bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                       config=None, split_k: Optional[int] = None, decoder: str = "auto",
                       ) -> torch.Tensor:
    """``x [M, K] @ W^T + bias -> [M, N]`` (x's dtype) with the Triton kernels.

    ``config`` pins a tile config (dict of the kernel's meta-parameters, ``num_warps``,
    ``num_stages``, ``maxnreg``) instead of autotuning, or, as a tuple (BN, BK, warps, programs
    per SM, prefetch), runs the GEMV with that tile (fast layout only: K % blocksize == 0,
    blocksize >= 32), or, as ("mma", *MmaTile fields), the mma.sync kernel (M <= 16, CUDA);
    ``split_k`` pins the split-K factor;
    ``decoder`` "prmt" / "table" / "auto" picks the 4-bit decoder; ``out`` [M, N] receives y.
    """
    q = _Quant(packed, code, absmax, N, K, blocksize, absmax2, code2, offset, blocksize2)
    x, out, M, empty = _operands(x, K, N, out, "x")
    if empty:
        if bias is not None and K == 0:
            out.copy_(bias.expand(M, N))
        return out
    if bias is not None and bias.numel() != N:
        raise QuantError(f"matmul_4bit: bias has {bias.numel()} values, expected {N}")
    bias_t = bias.contiguous() if bias is not None else out
    mb = _m_bucket(M)
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise QuantError(f"matmul_4bit: split_k must be a positive int, got {split_k!r}")
    if isinstance(config, MmaTile) or isinstance(config, tuple) and config[:1] == ("mma",):
        tile = config if isinstance(config, MmaTile) else config[1:]
        if _decoder(decoder) == "table":
            raise QuantError("matmul_4bit: the mma kernel decodes with PRMT; decoder 'table' "
                             "(or PEFTLAB_4BIT_DECODER=table) asks for the tiled kernel")
        _mma(x, q, bias, out, M, N, K, tile, split_k, check=True)
        return out
    if config is None and _mma_ok(x, q, M, decoder):
        _mma(x, q, bias, out, M, N, K, None, split_k, check=False)
        return out
    if isinstance(config, tuple) and not q.fast:
        raise QuantError(f"matmul_4bit: a GEMV tile config {config} needs K % blocksize == 0 "
                         f"and blocksize >= 32, got K = {K}, blocksize = {blocksize}")
    if q.fast and (config is None and M <= GEMV_MAX_M or isinstance(config, tuple)):
        _gemv(x, q, bias, out, M, N, K, config, split_k, _use_prmt(x, q.fast, decoder))
        return out
    cfgs = _bucket_configs(_FWD_BUCKETS, mb) if config is None else [config]
    target, steps = 4 * _num_sms(x.device), _cdiv(K, q.bk)

    def tiles(meta):
        return _cdiv(M, meta["BM"]) * _cdiv(N, meta["BN"])

    def grid(meta):
        return (tiles(meta), split_k or _num_splits(tiles(meta), steps, target, M, K))
    s_max = max(grid(_meta(c))[1] for c in cfgs)
    args = (x, *q.args(x.dtype), bias_t, out, _workspace(s_max, M, N, x.device),
            _counters(x.device, max(tiles(_meta(c)) for c in cfgs)),
            M, N, K, K // 8, K // blocksize, x.stride(0), out.stride(0), mb)
    consts = dict(BS=blocksize, BS2=q.bs2, NESTED=q.nested, HAS_BIAS=bias is not None,
                  FAST=q.fast, BK=q.bk, USE_PRMT=_use_prmt(x, q.fast, decoder),
                  IS_BF16=x.dtype == torch.bfloat16, DOT_F32=_dot_f32(x),
                  LOOP_STAGES=None if q.fast else 1)
    _launch(_mm4_fwd_kernel, _mm4_fwd_tuned, grid, args, consts, config,
            _bucket_configs(_FWD_BUCKETS, mb))
    return out


def _mma_ok(x: torch.Tensor, q: "_Quant", M: int, decoder: str) -> bool:
    """Whether the mma.sync kernel takes this call by default (see ``MMA_MAX_M``)."""
    return (M <= min(MMA_MAX_M, 16) and os.environ.get("PEFTLAB_4BIT_MMA", "1") != "0"
            and _decoder(decoder) != "table" and _mma_unfit(x, q) is None)


def _gemv(x, q: "_Quant", bias, out, M, N, K, config, split_k, use_prmt) -> None:
    """Launch ``_mm4_gemv_kernel`` (x [M <= GEMV_MAX_M, K], fast layout) with tile ``config`` =
    (BN, BK, warps, programs per SM, prefetch), or the fastest of GEMV_CONFIGS on this shape
    (timed once on CUDA; ``PEFTLAB_GEMV_TUNE=0`` takes the first; the interpreter a small fixed
    tile)."""
    bm = max(1, 1 << (M - 1).bit_length())
    # the fp32 table for float32 x (exact codes; this path has no TF32 dot)
    table, tab = _tables(q.code, x.dtype) if x.dtype != torch.float32 else (q.code, q.code)
    bias_t = bias.contiguous() if bias is not None else out

    def launch(cfg):
        bn, bk, warps, per_sm, prefetch = cfg
        wpb = min(q.bs, bk) // 8
        nbk = max(1, bk // q.bs)
        tiles, steps = _cdiv(N, bn), _cdiv(K, bk)
        s = split_k or max(1, min(steps, MAX_SPLIT, _cdiv(per_sm * _num_sms(x.device), tiles)))
        s = _cdiv(steps, _cdiv(steps, s))                      # no empty split
        _mm4_gemv_kernel[(tiles, s)](
            x, q.weight, table, tab, q.absmax, q.am2, q.code2, q.off, bias_t, out,
            _workspace(s, M, N, x.device), _counters(x.device, tiles), M, N, K, K // 8,
            K // q.bs, x.stride(0), out.stride(0), bm, BS=q.bs, BS2=q.bs2, NESTED=q.nested,
            HAS_BIAS=bias is not None, USE_PRMT=use_prmt, BM=bm, BN=bn, NBK=nbk, WPB=wpb,
            PREFETCH=prefetch, EVEN_K=K % bk == 0 and steps % s == 0, num_warps=warps)

    if config is None and _interpreting():
        config = (16, 128, 4, 1, True)
    if config is None and os.environ.get("PEFTLAB_GEMV_TUNE", "1") == "0":
        config = GEMV_CONFIGS[0]                               # no timing: the first tile
    if config is None:
        key = (bm, N, K, q.bs, q.nested, x.dtype, use_prmt, bias is not None, str(x.device))
        config = _GEMV_BEST.get(key)
        if config is None:
            config, GEMV_TIMES[key] = fastest(
                GEMV_CONFIGS, lambda c: triton.testing.do_bench(lambda: launch(c), warmup=5,
                                                                rep=25), "matmul_4bit GEMV")
            _GEMV_BEST[key] = config
    launch(config)


def gemv_choice(M: int, N: int, K: int) -> Optional[tuple]:
    """(tile, [(tile, ms) of every candidate]) picked by timing for this shape (the first
    match), or None."""
    bm = max(1, 1 << (M - 1).bit_length())
    return next(((v, GEMV_TIMES.get(k, [])) for k, v in _GEMV_BEST.items()
                 if k[:3] == (bm, N, K)), None)


def matmul4bit_backward_input(grad_y: torch.Tensor, packed: torch.Tensor, code: torch.Tensor,
                              absmax: torch.Tensor, N: int, K: int, blocksize: int, *,
                              absmax2: Optional[torch.Tensor] = None,
                              code2: Optional[torch.Tensor] = None,
                              offset: Optional[torch.Tensor] = None, blocksize2: int = 256,
                              out: Optional[torch.Tensor] = None, config=None,
                              decoder: str = "auto") -> torch.Tensor:
    """``grad_y [M, N] @ W [N, K] -> grad_x [M, K]`` (grad_y's dtype), W decoded in-kernel."""
    q = _Quant(packed, code, absmax, N, K, blocksize, absmax2, code2, offset, blocksize2)
    g, out, M, empty = _operands(grad_y, N, K, out, "grad_y")
    if empty:
        return out
    mb = _m_bucket(M)

    def grid(meta):
        return (_cdiv(M, meta["BM"]) * _cdiv(K, q.bk),)
    args = (g, *q.args(g.dtype), out, M, N, K, K // 8, K // blocksize, g.stride(0),
            out.stride(0), mb)
    consts = dict(BS=blocksize, BS2=q.bs2, NESTED=q.nested, FAST=q.fast, BK=q.bk,
                  USE_PRMT=_use_prmt(g, q.fast, decoder), IS_BF16=g.dtype == torch.bfloat16,
                  DOT_F32=_dot_f32(g), LOOP_STAGES=None if q.fast else 1)
    _launch(_mm4_bwd_kernel, _mm4_bwd_tuned, grid, args, consts, config,
            _bucket_configs(_BWD_BUCKETS, mb))
    return out


# ---------------------------------------------------------------------------------------------
# QuantState API and autograd
# ---------------------------------------------------------------------------------------------
def _state_args(state: QuantState) -> dict:
    return dict(absmax2=state.absmax2, code2=state.code2, offset=state.offset,
                blocksize2=state.blocksize2 or 256)


def _use_kernels(x: torch.Tensor, impl: str) -> bool:
    if impl not in IMPLS:
        raise QuantError(f"matmul_4bit: impl {impl!r} is not one of {IMPLS}")
    if impl == "triton" and not (x.is_cuda or _interpreting()):
        raise QuantError("matmul_4bit: impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1)")
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def _dequant(packed, state, dtype, impl):
    if impl == "reference":
        return dequantize_4bit_reference(packed, state, out_dtype=dtype)
    return dequantize_4bit(packed, state, out_dtype=dtype)


class Matmul4bitFunction(torch.autograd.Function):
    """``y = x @ dequant(packed)^T + bias``; backward ``grad_x = g @ W``, ``grad_b = sum_rows g``
    (derivation in the module docstring; no gradient for the frozen 4-bit weight)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias=None, impl="auto", decoder="auto"):
        N, K = state.shape
        if _use_kernels(x, impl):
            y = matmul4bit_forward(x, packed, state.code, state.absmax, N, K, state.blocksize,
                                   bias=bias, decoder=decoder, **_state_args(state))
            y = y.view(*x.shape[:-1], N)
        else:
            w = _dequant(packed, state, x.dtype, impl)
            y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(packed)
        ctx.state, ctx.impl, ctx.decoder = state, impl, decoder
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        state, impl = ctx.state, ctx.impl
        N, K = state.shape
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            if _use_kernels(grad_y, impl):
                grad_x = matmul4bit_backward_input(grad_y, packed, state.code, state.absmax, N,
                                                   K, state.blocksize, decoder=ctx.decoder,
                                                   **_state_args(state))
                grad_x = grad_x.view(*grad_y.shape[:-1], K)
            else:
                grad_x = grad_y @ _dequant(packed, state, grad_y.dtype, impl)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_b = grad_y.reshape(-1, N).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, None, None, grad_b, None, None


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: Optional[torch.Tensor] = None, impl: str = "auto",
                decoder: str = "auto") -> torch.Tensor:
    """``x [..., K] @ dequant(packed, state)^T + bias -> [..., N]`` in x's dtype (see module
    docstring); differentiable in ``x`` and ``bias``. ``impl``: "auto", "triton", "reference";
    ``decoder`` (kernels): "auto", "prmt", "table"."""
    if not isinstance(state, QuantState):
        raise QuantError(f"matmul_4bit: state must be a QuantState, got {type(state).__name__}")
    state.check("matmul_4bit", packed)
    if len(state.shape) != 2:
        raise QuantError(f"matmul_4bit: weight shape {tuple(state.shape)} is not 2-D [N, K]")
    N, K = state.shape
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != K:
        raise QuantError(f"matmul_4bit: x of shape {tuple(getattr(x, 'shape', ()))} does not end "
                         f"in K = {K} (weight [{N}, {K}])")
    if x.dtype not in _X_DTYPES:
        raise QuantError(f"matmul_4bit: x dtype {x.dtype} is not float16, bfloat16 or float32")
    for name, t in (("packed weight", packed), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise QuantError(f"matmul_4bit: x on {x.device} but {name} on {t.device}")
    if bias is not None and bias.shape != (N,):
        raise QuantError(f"matmul_4bit: bias of shape {tuple(bias.shape)}, expected ({N},)")
    return Matmul4bitFunction.apply(x, packed, state, bias, impl, decoder)


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference twin in plain PyTorch: dequantize to x's dtype, then ``F.linear``."""
    return matmul_4bit(x, packed, state, bias, impl="reference")
