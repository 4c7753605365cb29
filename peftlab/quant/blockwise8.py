"""Blockwise 8-bit quantization with a 256-entry code table (bitsandbytes' quantize_blockwise).

Dettmers et al. 2022 (8-bit optimizers, arXiv 2110.02861, section 2.1) split a tensor into
blocks of ``B`` consecutive elements (over the flattened tensor) and store, per block ``b``,
``absmax_b = max_{i in b} |x_i|`` in float32 and, per element, the index of the code value
nearest to the normalised value::

    q_i = argmin_k | x_i / absmax_b - code[k] |        x_i ~= code[q_i] * absmax_b

QLoRA (arXiv 2305.14314, section 3, "Double Quantization") applies exactly this, with the signed
dynamic map and ``B = 256``, to the float32 absmax constants of 4-bit blocks; the paged 8-bit
optimizer applies it to its moment estimates.

Shapes: ``x`` any shape, ``n = x.numel()``; codes uint8 shaped like ``x``; absmax float32
``[ceil(n / B)]``.

Exact arithmetic (bit-exact with bitsandbytes 0.50.2, see ``rounding``):

* ``rounding="nearest"`` (default) follows bitsandbytes' pure-PyTorch backend, which is also what
  its CUDA kernel computes up to exact ties: full blocks are scaled by the float32 reciprocal,
  ``x * (1 / max(absmax, 1e-38))``, a ragged last block by division, ``x / max(absmax, 1e-38)``,
  and that last block stores the clamped absmax; values are clamped to [-1, 1]; the index is
  ``#(bounds < s)`` with ``bounds[k] = (code[k] + code[k+1]) / 2`` in float32, i.e. the nearest
  code value and on an exact tie the *lower* one. An all-zero block stores absmax 0 and the
  index of the code value 0.
* ``rounding="lut"`` reproduces bitsandbytes 0.50.2's native CPU kernel, which does not search
  the code: it maps ``s = clamp(x * (1/absmax), -1, 1)`` (reciprocal for every block) to one of
  65536 grid points, ``j = trunc(((s + 1) * 0.5) * 65535 + 0.5)``, and returns the code value
  nearest to grid point ``j`` (ties lower), precomputed in a table. That is within a grid step
  of the nearest code and differs from it for about 0.15 % of Gaussian values (up to 4 code
  steps, more for values within 1e-4 of zero). All-zero blocks store absmax 0 and index 0.
  Use it to reproduce tensors quantized by bitsandbytes on a CPU.

The code table must be ascending (every bitsandbytes map is); that is not checked on the hot
path. Dequantization is ``code[q] * absmax`` in float32, rounded once to the output dtype.
On CUDA (with Triton importable) both directions run the Triton kernels of
``peftlab.kernels.quant4bit``, bit-exact with the references here.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

from ..errors import QuantError
from .codes import dynamic_map

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "lut")
LUT_SIZE = 65536
_TINY = 1e-38  # bitsandbytes' absmax floor (a float32 subnormal)


def check_float_tensor(x, what: str) -> None:
    """A float32/float16/bfloat16 tensor with at least one element, else QuantError."""
    if not isinstance(x, torch.Tensor):
        raise QuantError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise QuantError(f"{what}: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if x.numel() == 0:
        raise QuantError(f"{what}: tensor of shape {tuple(x.shape)} has no elements")


def check_blocksize(blocksize, what: str, allowed: Sequence[int]) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise QuantError(f"{what}: blocksize {blocksize!r} is not one of {list(allowed)}")
    return blocksize


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``vals[i] * absmax[i // blocksize]`` in float32 for flat ``vals`` ([n]) -> [n]."""
    n = vals.numel()
    nb = absmax.numel()
    vals = torch.nn.functional.pad(vals.float(), (0, nb * blocksize - n)).view(nb, blocksize)
    return (vals * absmax.float().unsqueeze(1)).view(-1)[:n]


def nearest_scale(flat: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and normalised values, bitsandbytes' pure-PyTorch arithmetic.

    ``flat``: float32 ``[n]``. Returns ``(scaled [n] in [-1, 1], absmax [ceil(n/B)])``: full
    blocks use the reciprocal of ``max(absmax, 1e-38)`` and keep the raw absmax, a ragged last
    block divides by and stores the clamped absmax.
    """
    n = flat.numel()
    full = n // blocksize
    cut = full * blocksize
    scaled, absmax = [], []
    if full:
        blocks = flat[:cut].view(full, blocksize)
        am = blocks.abs().amax(dim=1)
        scaled.append((blocks * (1.0 / am.clamp(min=_TINY)).unsqueeze(1)).clamp(-1, 1).view(-1))
        absmax.append(am)
    if cut < n:
        am = flat[cut:].abs().max().clamp(min=_TINY)
        scaled.append((flat[cut:] / am).clamp(-1, 1))
        absmax.append(am.view(1))
    return torch.cat(scaled), torch.cat(absmax)


@lru_cache(maxsize=8)
def _lut_cached(code_key: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_key), dtype=torch.float32)
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids, grid).clamp(max=code.numel() - 1).to(torch.uint8)


def lut_table(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: grid point ``-1 + 2j/65535`` -> nearest code index."""
    c = code.detach().to("cpu", torch.float32).contiguous()
    return _lut_cached(c.numpy().tobytes()).to(code.device)


def _lut_quantize(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    am = padded.abs().amax(dim=1)
    s = (padded * (1.0 / am).unsqueeze(1)).clamp(-1, 1)
    j = (((s + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = lut_table(code)[j.clamp(0, LUT_SIZE - 1)]
    q = torch.where((am == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.view(-1)[:n], am


def _check_code(code: torch.Tensor, what: str, size: int) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or code.numel() != size:
        shape = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
        raise QuantError(f"{what}: code table must be a 1-D tensor of {size} values, got {shape}")
    return code.float()


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_quantize8_args(x, code, blocksize, rounding) -> Optional[torch.Tensor]:
    """Validate quantize_blockwise_8bit's arguments; ``code`` as float32 on ``x``'s device
    (None stays None: the caller's default dynamic map)."""
    check_float_tensor(x, "quantize_blockwise_8bit: x")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise QuantError(f"quantize_blockwise_8bit: blocksize {blocksize!r} must be a positive int")
    if rounding not in ROUNDINGS:
        raise QuantError(f"quantize_blockwise_8bit: rounding {rounding!r} is not one of "
                         f"{ROUNDINGS}")
    return None if code is None else _check_code(code.to(x.device), "quantize_blockwise_8bit", 256)


def quantize_blockwise_8bit_reference(x: torch.Tensor, code: Optional[torch.Tensor] = None,
                                      blocksize: int = 256, rounding: str = "nearest"):
    """Pure-PyTorch blockwise 8-bit quantization; see the module docstring."""
    code = check_quantize8_args(x, code, blocksize, rounding)
    code = dynamic_map(True, device=x.device) if code is None else code
    flat = x.detach().reshape(-1).float()
    if rounding == "lut":
        q, absmax = _lut_quantize(flat, code, blocksize)
    else:
        scaled, absmax = nearest_scale(flat, blocksize)
        q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return q.view(x.shape), absmax


def dequantize_blockwise_8bit_reference(codes: torch.Tensor, absmax: torch.Tensor,
                                        code: Optional[torch.Tensor] = None, blocksize: int = 256,
                                        shape=None, dtype: torch.dtype = torch.float32):
    """``code[codes] * absmax`` per block in float32, rounded once to ``dtype``."""
    code, shape, _ = _check_dequant_args(codes, absmax, code, blocksize, shape, dtype)
    out = scale_blocks(code[codes.reshape(-1).long()], absmax, blocksize)
    return out.to(dtype).view(shape)


def _check_dequant_args(codes, absmax, code, blocksize, shape, dtype):
    what = "dequantize_blockwise_8bit"
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise QuantError(f"{what}: codes must be a uint8 tensor, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise QuantError(f"{what}: blocksize {blocksize!r} must be a positive int")
    if dtype not in FLOAT_DTYPES:
        raise QuantError(f"{what}: output dtype {dtype} is not float32, float16 or bfloat16")
    shape = tuple(codes.shape) if shape is None else tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if n != codes.numel():
        raise QuantError(f"{what}: shape {shape} has {n} elements but codes has {codes.numel()}")
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != num_blocks(n, blocksize):
        raise QuantError(f"{what}: absmax has {getattr(absmax, 'numel', lambda: '?')()} values, "
                         f"expected {num_blocks(n, blocksize)} for {n} elements in blocks of "
                         f"{blocksize}")
    code = dynamic_map(True, device=codes.device) if code is None else code.to(codes.device)
    return _check_code(code, what, 256), shape, n


def quantize_blockwise_8bit(x: torch.Tensor, code: Optional[torch.Tensor] = None,
                            blocksize: int = 256, rounding: str = "nearest"):
    """Blockwise 8-bit quantization -> ``(uint8 codes shaped like x, float32 absmax)``.

    ``code`` defaults to ``dynamic_map(signed=True)``. Triton kernel on CUDA, else reference.
    """
    if isinstance(x, torch.Tensor) and _use_triton(x):
        from peftlab.kernels.quant4bit import quantize_blockwise_8bit_triton

        return quantize_blockwise_8bit_triton(x, code, blocksize, rounding)
    return quantize_blockwise_8bit_reference(x, code, blocksize, rounding)


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              code: Optional[torch.Tensor] = None, blocksize: int = 256,
                              shape=None, dtype: torch.dtype = torch.float32):
    """Inverse of :func:`quantize_blockwise_8bit`; Triton kernel on CUDA, else reference."""
    if isinstance(codes, torch.Tensor) and _use_triton(codes):
        from peftlab.kernels.quant4bit import dequantize_blockwise_8bit_triton

        return dequantize_blockwise_8bit_triton(codes, absmax, code, blocksize, shape, dtype)
    return dequantize_blockwise_8bit_reference(codes, absmax, code, blocksize, shape, dtype)
