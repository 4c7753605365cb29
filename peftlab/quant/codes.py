"""Code tables: the 16 (or 256) values a 4-bit (8-bit) index stands for.

Blockwise quantization (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, section 3) stores a
tensor as indices into a small *code* table ``c`` plus one float scale per block::

    w_i  ~=  c[q_i] * absmax(block(i)),        q_i = argmin_k | w_i / absmax - c[k] |

so the table decides where the precision goes. This file builds every table we use, in code,
bit-for-bit equal to what bitsandbytes 0.50.2 stores (`quant_map` / `nested_quant_map` in its
state dicts):

* NF4 (NormalFloat, QLoRA section 3, eq. 4): the values are quantiles of N(0, 1). With
  ``delta = 0.9677083 = 1 - (1/32 + 1/30) / 2`` (the outermost quantile bitsandbytes uses),
  the 8 positive levels are ``Phi^-1(p)`` for 8 points ``p`` evenly spaced in ``[delta, 1/2)``,
  the 7 negative levels are ``-Phi^-1(p)`` for 7 points in ``[delta, 1/2)``, plus an exact 0;
  all divided by the largest so the table spans ``[-1, 1]``. The asymmetry (8 positive, 7
  negative) buys the exact zero. Each level then carries about the same probability mass of a
  normal weight, which is what makes NF4 information-theoretically near-optimal for normally
  distributed weights. ``Phi^-1`` is ``torch.special.ndtri`` in float64 (no scipy); the
  quantile points are float32 (as bitsandbytes computes them) and the result is rounded to
  float32 before normalising, exactly as bitsandbytes' ``create_normal_map``.
* FP4 (E2M1, 1 sign, 2 exponent, 1 mantissa bit) in bitsandbytes' *bit-pattern order*: index
  ``0bSEEM``; exponent field 0 is subnormal (``M * 0.0625``), exponent field ``e`` in 1..3 is
  ``(1 + M/2) * 2**(4 - e)``; sign bit negates; everything divided by 12 (the largest value).
  Index 8 is +0.0 (bitsandbytes writes ``-0`` as a Python int, which is plain zero).
* Int4: the symmetric integer grid ``k / 7``, k = -7..7, in bitsandbytes' "int4" order; only
  used to compare quantization error against NF4/FP4 (it is not a bitsandbytes storage type).
* ``dynamic_map(signed)``: the 8-bit dynamic-exponent map (Dettmers 2015, arXiv 1511.04561)
  bitsandbytes uses for 8-bit optimizer states and for double quantization of the absmax
  constants (QLoRA section 3, "Double Quantization"). For exponent ``i`` = 0..6 the fraction
  part ``linspace(0.1, 1, 2**i + 1)`` (signed; ``2**(i+1) + 1`` unsigned) is reduced to bin
  midpoints and scaled by ``10**(i - 6)``; add 0 and 1, sort: 256 float32 values.

Shapes: 4-bit tables are float32 ``[16]``; the dynamic map is float32 ``[256]``, ascending.
Every function returns a fresh tensor (callers may move or modify it).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

from ..errors import QuantError

QUANT_TYPES = ("nf4", "fp4")
NF4_OFFSET = 0.9677083  # outermost quantile of the NF4 construction (bitsandbytes' default)


@lru_cache(maxsize=None)
def _nf4_cpu() -> torch.Tensor:
    pos_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1].double()
    neg_p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1].double()
    pos = torch.special.ndtri(pos_p).float()
    neg = (-torch.special.ndtri(neg_p)).float()
    values = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return values / values.max()


@lru_cache(maxsize=None)
def _fp4_cpu() -> torch.Tensor:
    vals = []
    for idx in range(16):
        sign, exp, man = idx >> 3, (idx >> 1) & 3, idx & 1
        mag = man * 0.0625 if exp == 0 else (1.0 + 0.5 * man) * 2.0 ** (4 - exp)
        vals.append(-mag if (sign and mag) else mag)  # index 8 stays +0.0
    t = torch.tensor(vals, dtype=torch.float32)
    return t / t.abs().max()


@lru_cache(maxsize=None)
def _int4_cpu() -> torch.Tensor:
    t = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32)
    return t / 7.0


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 levels, ascending, float32 (index 7 is exactly 0, index 15 is 1)."""
    return _nf4_cpu().to(device, copy=True)


def fp4_code(device=None) -> torch.Tensor:
    """The 16 FP4 (E2M1) levels in bitsandbytes' bit-pattern order, float32."""
    return _fp4_cpu().to(device, copy=True)


def int4_code(device=None) -> torch.Tensor:
    """The symmetric Int4 grid k/7 (bitsandbytes' "int4" order), float32; for comparisons."""
    return _int4_cpu().to(device, copy=True)


def get_code(quant_type: str, device=None) -> torch.Tensor:
    """Code table for ``quant_type`` in {"nf4", "fp4", "int4"}."""
    tables = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
    if quant_type not in tables:
        raise QuantError(f"quant_type {quant_type!r} is not one of {sorted(tables)}")
    return tables[quant_type](device)


@lru_cache(maxsize=None)
def _dynamic_cpu(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    parts = []

    def decade(i: int, items: int) -> None:
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        parts.append(scale * means)
        if signed:
            parts.append(-scale * means)

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        decade(i, 2 ** shift + 1)
    if extra > 0:
        decade(max_exponent_bits - 1, extra + 1)
    parts.append(torch.tensor([0.0, 1.0]))
    data = torch.cat(parts)
    if data.numel() != 2 ** total_bits:
        raise QuantError(f"dynamic_map: {data.numel()} values for total_bits={total_bits}")
    if data.numel() < 256:
        data = torch.cat([data, torch.zeros(256 - data.numel())])
    return data.sort().values


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8,
                device=None) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map``: 256 ascending float32 values in [-1, 1] ([0, 1]).

    ``signed=True`` is the map of double quantization and of signed optimizer states (Adam's
    first moment); ``signed=False`` the map of non-negative states (Adam's second moment).
    """
    if not 1 <= max_exponent_bits < total_bits <= 8:
        raise QuantError(f"dynamic_map: need 1 <= max_exponent_bits < total_bits <= 8, got "
                         f"max_exponent_bits={max_exponent_bits}, total_bits={total_bits}")
    return _dynamic_cpu(bool(signed), int(max_exponent_bits), int(total_bits)).to(device, copy=True)


def decision_bounds(code: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring levels and the map from sorted position to code index.

    Nearest-level quantization with ties to the lower level is ``order[#(bounds < x)]``, where
    ``bounds[k] = (s[k] + s[k+1]) / 2`` over the ascending levels ``s = code[order]`` (float32
    arithmetic, as bitsandbytes computes them). ``order`` comes from a *stable* argsort, so of
    two equal levels (FP4's two zeros, indices 0 and 8) the lower index sorts first.
    Returns ``(bounds float32 [K-1], order int64 [K])`` on ``code``'s device.
    """
    code = code.float()
    order = torch.argsort(code, stable=True)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order
