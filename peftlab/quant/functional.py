"""4-bit blockwise quantization (NF4 / FP4) with double quantization: the PyTorch reference.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) stores a weight ``W`` (any shape,
``n`` elements, flattened in row-major order) in blocks of ``B`` consecutive elements::

    absmax_b = max_{i in b} |W_i|                                  float32 [nb], nb = ceil(n / B)
    q_i      = argmin_k | W_i / absmax_b - c_k |                   4 bits, c = NF4 or FP4 table
    W_i     ~= c[q_i] * absmax_b                                   (eq. 1-3 of the paper)

Two indices share a byte, the *first* element in the high nibble: ``packed[j] = q_{2j} << 4 |
q_{2j+1}``, shaped ``[(n + 1) // 2, 1]`` as bitsandbytes stores it (an odd ``n`` pads one index:
the code of 0.0). Double quantization (section 3, eq. 6) quantizes the absmax constants once
more: ``offset = mean(absmax)``; ``absmax - offset`` goes through blockwise 8-bit quantization
with the signed dynamic map and blocks of 256 (``blockwise8.py``), which costs
``8/B + 32/(256 B)`` bits per parameter (0.127 for B = 64) instead of ``32/B`` (0.5).
Decoding is ``absmax_b = code2[qa_b] * absmax2[b // 256] + offset`` (two float32 roundings,
no fused multiply-add) and then ``c[q_i] * absmax_b`` in float32, rounded once to the output
dtype (round to nearest even).

Exact arithmetic, bit-exact with bitsandbytes 0.50.2 on the CPU (its 4-bit quantizer there is
the pure-PyTorch backend): a full block is scaled by the float32 reciprocal,
``W * (1 / max(absmax, 1e-38))``, a ragged last block (``n % B != 0``) by division,
``W / max(absmax, 1e-38)``, and stores that clamped absmax; values are clamped to [-1, 1]; the
index is the nearest level with exact ties going to the *lower* level (``#(bounds < s)`` over
float32 midpoints ``bounds``, see ``codes.decision_bounds``). Double quantization's 8-bit step
uses exact nearest rounding by default (``nested_rounding="nearest"``: bitsandbytes' PyTorch
backend and, up to exact ties, its CUDA kernel); ``nested_rounding="lut"`` reproduces the
65536-entry lookup table of bitsandbytes' native CPU kernel, which differs from nearest for
about 0.15 % of the absmax codes (see ``blockwise8.py``).

Where bitsandbytes' own backends disagree (we follow its CPU / pure-PyTorch backends):

* All-zero block. CPU/PyTorch: absmax 0 (1e-38 if it is the ragged last block), every index is
  the code of 0.0 (NF4 byte 0x77, FP4 0x00). CUDA (csrc/kernels.cu, kQuantizeBlockwise): it
  multiplies by ``1 / absmax`` with no floor, so 0 * inf = NaN, which fails every ``>`` of the
  NF4 decision tree and lands on index 0 (the -1.0 level): NF4 bytes 0x00. Both decode to
  zeros (-0.0 there, +0.0 here). The same NaN path gives 8-bit index 0 for a zero absmax block.
* FP4 near zero. CPU/PyTorch sort the FP4 table with a stable argsort, so |s| <= 1/384 maps
  to index 0 (+0.0) for s <= 0 and to index 8 (also 0.0) for 0 < s <= 1/384 (bytes differ,
  values do not). CUDA's ``dQuantizeFP4`` takes the sign first (index 8 for s < 0) and uses
  rounded thresholds (0.583333f, 0.00260417f, ...) instead of exact float32 midpoints, so a
  value within a few ulps of those two thresholds may round differently.
* Ragged last block: CUDA multiplies by the reciprocal there too (we divide, as the CPU does);
  the two differ only where ``x / a`` and ``x * (1 / a)`` straddle a decision boundary.
* bitsandbytes' CPU *dequantize* of a 2-D weight whose rows are shorter than a block and whose
  last dimension is a multiple of 16 (e.g. shape (4, 32) with B = 64) indexes absmax per row
  and returns wrong values (its AVX-512 path); we decode over the flattened tensor, which is
  what its CUDA and PyTorch backends do.
* Non-finite weights: bitsandbytes propagates NaN into absmax; we raise QuantError.

Shapes: ``W`` float32/float16/bfloat16, any shape, ``n >= 1``; ``B`` in {32, ..., 4096} (powers
of two; others raise QuantError). ``quantize_4bit`` dispatches to the Triton kernel of
``peftlab.kernels.quant4bit`` when ``W`` is on CUDA and Triton imports, else to
``quantize_4bit_reference``; likewise ``dequantize_4bit``. Both paths give identical bits.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from ..errors import QuantError
from .blockwise8 import (ROUNDINGS, check_blocksize, check_float_tensor, FLOAT_DTYPES,
                         dequantize_blockwise_8bit_reference, nearest_scale,
                         quantize_blockwise_8bit_reference, scale_blocks, _use_triton)
from .codes import QUANT_TYPES, decision_bounds, dynamic_map, get_code
from .state import BLOCKSIZES_4BIT, NestedState, QuantState

NESTED_BLOCKSIZE = 256


def check_quantize_args(w, blocksize, quant_type, nested_rounding) -> None:
    """Validate the arguments of quantize_4bit (shared by the reference and the kernel)."""
    check_float_tensor(w, "quantize_4bit: weight")
    check_blocksize(blocksize, "quantize_4bit", BLOCKSIZES_4BIT)
    if quant_type not in QUANT_TYPES:
        raise QuantError(f"quantize_4bit: quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    if nested_rounding not in ROUNDINGS:
        raise QuantError(f"quantize_4bit: nested_rounding {nested_rounding!r} is not one of "
                         f"{ROUNDINGS}")


def check_finite_absmax(absmax: torch.Tensor, what: str = "quantize_4bit: weight",
                        mean: Optional[torch.Tensor] = None) -> None:
    """QuantError naming the first block whose absmax is NaN or Inf.

    ``mean``: ``absmax.mean()`` when already computed (double quantization's offset). absmax is
    >= 0 or NaN, so a finite mean proves every block finite and the scan is skipped (one scalar
    read); a non-finite mean (a bad block, or a sum that overflowed) falls back to the scan.
    """
    if mean is not None and math.isfinite(float(mean)):
        return
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        block = int(bad.nonzero()[0, 0])
        raise QuantError(f"{what}: block {block} contains NaN or Inf values")


def build_state(absmax: torch.Tensor, w: torch.Tensor, blocksize: int, quant_type: str,
                double_quant: bool, nested_rounding: str,
                quantize8: Callable = quantize_blockwise_8bit_reference,
                code: Optional[torch.Tensor] = None,
                code2: Optional[torch.Tensor] = None,
                fused_offset: bool = False) -> QuantState:
    """Assemble the QuantState from float32 absmax, double-quantizing it when asked.

    ``quantize8(x, code, blocksize, rounding)`` is the 8-bit quantizer (reference or kernel);
    with ``fused_offset`` it is called as ``quantize8(absmax, code, blocksize, rounding,
    offset)`` and quantizes ``absmax - offset`` itself (a kernel that fuses the subtraction).
    ``code`` / ``code2`` (the 4-bit table and the dynamic map, owned by the new state) default
    to fresh tables on ``absmax``'s device.
    """
    code = get_code(quant_type, absmax.device) if code is None else code
    if not double_quant:
        return QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                          quant_type=quant_type, code=code)
    offset = absmax.mean()
    code2 = dynamic_map(True, device=absmax.device) if code2 is None else code2
    if fused_offset:
        qabs, absmax2 = quantize8(absmax, code2, NESTED_BLOCKSIZE, nested_rounding, offset)
    else:
        qabs, absmax2 = quantize8(absmax - offset, code2, NESTED_BLOCKSIZE, nested_rounding)
    return QuantState(absmax=qabs, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                      quant_type=quant_type, code=code, offset=offset,
                      state2=NestedState(absmax=absmax2, code=code2, blocksize=NESTED_BLOCKSIZE))


def absmax_float32(state: QuantState) -> torch.Tensor:
    """Per-block float32 absmax, decoding double quantization (code2 * absmax2, then + offset)."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    am = dequantize_blockwise_8bit_reference(state.absmax, s2.absmax, s2.code, s2.blocksize,
                                             dtype=torch.float32)
    return am + state.offset.float()


def quantize_4bit_reference(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                            double_quant: bool = True, nested_rounding: str = "nearest",
                            ) -> Tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` -> ``(packed uint8 [(n+1)//2, 1], QuantState)`` in plain PyTorch."""
    check_quantize_args(w, blocksize, quant_type, nested_rounding)
    flat = w.detach().reshape(-1).float()
    scaled, absmax = nearest_scale(flat, blocksize)
    check_finite_absmax(absmax)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = decision_bounds(get_code(quant_type, w.device))
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).view(-1, 1)
    state = build_state(absmax, w, blocksize, quant_type, double_quant, nested_rounding)
    return packed, state


def check_dequantize_args(packed, state, out_dtype) -> torch.dtype:
    if not isinstance(state, QuantState):
        raise QuantError(f"dequantize_4bit: state must be a QuantState, got {type(state).__name__}")
    state.check("dequantize_4bit", packed)
    out_dtype = state.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise QuantError(f"dequantize_4bit: out_dtype {out_dtype} is not float32, float16 or "
                         f"bfloat16")
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    if any(t.device != packed.device for t in tensors):
        raise QuantError(f"dequantize_4bit: packed weight on {packed.device} but quant state on "
                         f"{[str(t.device) for t in tensors]}; move it with state.to(device)")
    return out_dtype


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState,
                              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode ``packed`` with ``state`` -> tensor of ``state.shape`` in ``out_dtype``
    (default ``state.dtype``), in plain PyTorch."""
    out_dtype = check_dequantize_args(packed, state, out_dtype)
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[:state.numel]
    out = scale_blocks(state.code.float()[idx.long()], absmax_float32(state), state.blocksize)
    return out.to(out_dtype).view(state.shape)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, nested_rounding: str = "nearest",
                  ) -> Tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` to 4 bits -> ``(packed uint8 [(n+1)//2, 1], QuantState)``.

    Triton kernel when ``w`` is on CUDA (and Triton imports), else the PyTorch reference.
    """
    if isinstance(w, torch.Tensor) and _use_triton(w):
        from peftlab.kernels.quant4bit import quantize_4bit_triton

        return quantize_4bit_triton(w, blocksize, quant_type, double_quant, nested_rounding)
    return quantize_4bit_reference(w, blocksize, quant_type, double_quant, nested_rounding)


def dequantize_4bit(packed: torch.Tensor, state: QuantState,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode a 4-bit tensor to ``state.shape`` in ``out_dtype`` (default ``state.dtype``).

    Triton kernel when ``packed`` is on CUDA (and Triton imports), else the PyTorch reference.
    """
    if isinstance(packed, torch.Tensor) and _use_triton(packed):
        from peftlab.kernels.quant4bit import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state, out_dtype)
    return dequantize_4bit_reference(packed, state, out_dtype)


def quantize_to_code(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64,
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization to an arbitrary 16-level table (e.g. ``int4_code()``), for
    comparing code tables: returns ``(indices uint8 [n], absmax float32 [nb])``, unpacked."""
    check_float_tensor(w, "quantize_to_code: weight")
    check_blocksize(blocksize, "quantize_to_code", BLOCKSIZES_4BIT)
    scaled, absmax = nearest_scale(w.detach().reshape(-1).float(), blocksize)
    bounds, order = decision_bounds(code.to(w.device))
    return order[torch.bucketize(scaled, bounds)].to(torch.uint8), absmax


def dequantize_from_code(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, shape) -> torch.Tensor:
    """Inverse of :func:`quantize_to_code`, float32 of ``shape``."""
    return scale_blocks(code.float().to(idx.device)[idx.long()], absmax, blocksize).view(shape)
