"""How many bits each quantized weight really costs, measured from the stored tensors.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3, "Double Quantization") counts the
storage of blockwise 4-bit weights per parameter. For a blockwise 4-bit weight of n elements, blocksize B and (with double quantization) second-level
blocks of B2 absmax values, the per-weight storage is

    4                       the packed codes (two per byte)
  + 32 / B                  one float32 absmax per block            (no double quant: 0.5 at B=64)
  or 8 / B + 32 / (B * B2)  uint8 absmax codes + one float32 scale per B2 blocks  (0.127 at 64/256)
  + 32 / n                  the double-quant offset (one float32 per tensor)

plus constant code tables (16 and 256 float32 values per tensor) that a format could share across
tensors. `quantization_report` sums the actual tensor sizes of every `Linear4bit`, once without
the tables ("data", the QLoRA paper's accounting: NF4 + DQ at B = 64 is 4.127) and once with them.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def quantization_report(model: nn.Module) -> Dict[str, float]:
    """{"layers", "weights", "bits_per_weight", "bits_per_weight_with_tables"} over Linear4bit modules."""
    from .linear4bit import Linear4bit

    layers = weights = data = tables = 0
    for m in model.modules():
        if not isinstance(m, Linear4bit):
            continue
        s = m.quant_state
        layers += 1
        weights += s.numel
        data += _nbytes(m.weight) + _nbytes(s.absmax) + _nbytes(s.offset)
        tables += _nbytes(s.code)
        if s.state2 is not None:
            data += _nbytes(s.state2.absmax)
            tables += _nbytes(s.state2.code)
    if not layers:
        return {"layers": 0, "weights": 0, "bits_per_weight": 0.0, "bits_per_weight_with_tables": 0.0}
    return {"layers": layers, "weights": weights, "bits_per_weight": 8 * data / weights,
            "bits_per_weight_with_tables": 8 * (data + tables) / weights}


def format_quantization_report(model: nn.Module) -> str:
    r = quantization_report(model)
    if not r["layers"]:
        return "no 4-bit layers"
    return (f"4-bit layers: {r['layers']}, {r['weights']:,} weights, {r['bits_per_weight']:.3f} bits/weight "
            f"({r['bits_per_weight_with_tables']:.3f} counting the code tables)")
