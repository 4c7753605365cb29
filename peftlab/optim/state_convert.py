"""Checking an optimizer state dict against a parameter layout, and converting state formats.

A state dict (torch.optim.Optimizer's format) is

    {"state": {param_id: {"step": scalar, "exp_avg": T, "exp_avg_sq": T, ...}},
     "param_groups": [{"lr": ..., "betas": ..., ..., "params": [param_id, ...]}, ...]}

where param ids are matched to parameters by position: the k-th id listed over all groups is the
k-th parameter of the optimizer. 32-bit states are float tensors of the parameter's shape; 8-bit
states (Dettmers et al. 2021, arXiv 2110.02861) are uint8 codes of the parameter's shape plus
`exp_avg_absmax` / `exp_avg_sq_absmax`, float32 [ceil(n / 256)], decoded with the signed
(exp_avg) and unsigned (exp_avg_sq) dynamic maps.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..errors import CheckpointError
from .adamw_reference import QUANT_BLOCK

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
UNSUPPORTED_FLAGS = ("amsgrad", "maximize")
WHERE = "optimizer state dict"


def _step_value(v, where: str) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise CheckpointError(f"{where}: 'step' must be a scalar, got shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise CheckpointError(f"{where}: 'step' must be a non-negative integer, got {v!r}")
    return int(v)


def _check_param_state(st: Any, p: torch.Tensor, where: str) -> Dict[str, Any]:
    if not isinstance(st, dict):
        raise CheckpointError(f"{where}: expected a mapping of state tensors, got {type(st).__name__}")
    unknown = sorted(set(st) - set(STATE_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unsupported state key(s) {unknown} (PagedAdamW keeps "
                              f"{list(STATE_KEYS)}; amsgrad is not implemented)")
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in st:
            raise CheckpointError(f"{where}: missing state '{key}'")
    out: Dict[str, Any] = {"step": _step_value(st["step"], where)}
    n = p.numel()
    quantized = isinstance(st["exp_avg"], torch.Tensor) and st["exp_avg"].dtype == torch.uint8
    for key in ("exp_avg", "exp_avg_sq"):
        t = st[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: '{key}' must be a tensor, got {type(t).__name__}")
        if t.numel() != n:
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(t.shape)} but the "
                                  f"parameter has shape {tuple(p.shape)}")
        if (t.dtype == torch.uint8) != quantized or not (quantized or t.is_floating_point()):
            raise CheckpointError(f"{where}: tensor '{key}' has dtype {t.dtype}; exp_avg and "
                                  f"exp_avg_sq must both be float or both uint8 codes")
        out[key] = t.detach().to("cpu", torch.uint8 if quantized else torch.float32).reshape(p.shape)
    if quantized:
        nb = -(-n // QUANT_BLOCK)
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            t = st.get(key)
            if not isinstance(t, torch.Tensor) or t.numel() != nb:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else "nothing"
                raise CheckpointError(f"{where}: 8-bit states need tensor '{key}' of {nb} "
                                      f"values, got {got}")
            out[key] = t.detach().to("cpu", torch.float32).reshape(-1)
    elif "exp_avg_absmax" in st or "exp_avg_sq_absmax" in st:
        raise CheckpointError(f"{where}: absmax tensors given with float (not 8-bit) states")
    return out


def check_state_dict(state_dict: Any, groups: Sequence[Dict[str, Any]],
                     params: Sequence[torch.Tensor]) -> Tuple[List[Dict[str, Any]], Dict[int, Dict[str, Any]]]:
    """Validate `state_dict` against our param groups; return (saved groups, {param index: state})."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{WHERE}: expected a mapping, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise CheckpointError(f"{WHERE}: missing key '{key}'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
        n = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "?"
        raise CheckpointError(f"{WHERE}: has {n} param groups, the optimizer has {len(groups)} "
                              f"(a different parameter layout)")
    id_map: Dict[Any, int] = {}
    index = 0
    for gi, (ours, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise CheckpointError(f"{WHERE}: param group {gi} has no 'params' list")
        if len(saved["params"]) != len(ours["params"]):
            raise CheckpointError(f"{WHERE}: param group {gi} lists {len(saved['params'])} "
                                  f"parameters, the optimizer's has {len(ours['params'])} "
                                  f"(a different parameter layout)")
        for flag in UNSUPPORTED_FLAGS:
            if saved.get(flag):
                raise CheckpointError(f"{WHERE}: param group {gi} was saved with {flag}=True, "
                                      f"which PagedAdamW does not implement")
        for pid in saved["params"]:
            id_map[pid] = index
            id_map[str(pid)] = index
            index += 1
    state = state_dict["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{WHERE}: 'state' must be a mapping, got {type(state).__name__}")
    out: Dict[int, Dict[str, Any]] = {}
    for pid, st in state.items():
        if pid not in id_map:
            raise CheckpointError(f"{WHERE}: state for parameter id {pid!r}, which no param group lists")
        i = id_map[pid]
        out[i] = _check_param_state(st, params[i], f"{WHERE}: parameter {i} (id {pid!r})")
    return [dict(g) for g in saved_groups], out


def to_bits(st: Dict[str, Any], bits: int, codes: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, Any]:
    """Convert one checked parameter state to 32-bit floats or 8-bit codes (`codes`: the signed
    and unsigned dynamic maps)."""
    from ..quant.blockwise8 import dequantize_blockwise_8bit, quantize_blockwise_8bit

    quantized = st["exp_avg"].dtype == torch.uint8
    if bits == 32 and quantized:
        out = {"step": st["step"]}
        for key, code in (("exp_avg", codes[0]), ("exp_avg_sq", codes[1])):
            out[key] = dequantize_blockwise_8bit(st[key], st[key + "_absmax"], code, QUANT_BLOCK,
                                                 st[key].shape, torch.float32)
        return out
    if bits == 8 and not quantized:
        out = {"step": st["step"]}
        for key, code in (("exp_avg", codes[0]), ("exp_avg_sq", codes[1])):
            q, a = quantize_blockwise_8bit(st[key], code, blocksize=QUANT_BLOCK)
            out[key], out[key + "_absmax"] = q, a
        return out
    return st
