"""Optimizer state dicts to and from safetensors, without pickle.

A torch optimizer state dict is flattened into tensors plus JSON metadata:

    tensors   "state.<param id>.<key>"  -> every tensor of the per-parameter state
                                          (e.g. state.3.exp_avg, state.3.step: a 0-d tensor)
    metadata  "format"        -> "peftlab.optimizer_state/1"
              "param_groups"  -> JSON list of the groups (hyper-parameters + param ids)
              "state_values"  -> JSON {param id: {key: value}} for non-tensor state entries

Tensor-valued group entries (a tensor lr) are stored as plain numbers. Works for
torch.optim.AdamW and PagedAdamW (32- and 8-bit) alike; the trainer checkpoints optimizers
through `optimizer_state_to_safetensors`, which writes atomically.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

from ..errors import CheckpointError
from ..fileio import load_safetensors, safetensors_metadata, save_safetensors

FORMAT = "peftlab.optimizer_state/1"


def _plain(v: Any, where: str) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise CheckpointError(f"{where}: a tensor with {v.numel()} elements cannot be stored "
                                  f"as a JSON value")
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, f"{where}.{k}") for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise CheckpointError(f"{where}: value of type {type(v).__name__} cannot be stored as JSON")


def flatten_optimizer_state(state_dict: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, string metadata) for a state dict; see the module docstring."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise CheckpointError("optimizer state dict: expected a mapping with 'state' and 'param_groups'")
    tensors: Dict[str, torch.Tensor] = {}
    values: Dict[str, Dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for key, v in st.items():
            if "." in str(key):
                raise CheckpointError(f"optimizer state dict: state key {key!r} of parameter {pid} "
                                      f"contains '.'")
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = v.detach().to("cpu").contiguous()
            else:
                values.setdefault(str(pid), {})[key] = _plain(v, f"state.{pid}.{key}")
    groups = [{k: _plain(v, f"param_groups[{gi}].{k}") for k, v in g.items()}
              for gi, g in enumerate(state_dict["param_groups"])]
    meta = {"format": FORMAT, "param_groups": json.dumps(groups), "state_values": json.dumps(values)}
    return tensors, meta


def _pid(s: str) -> Any:
    return int(s) if s.lstrip("-").isdigit() else s


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, str],
                              source: str = "optimizer state") -> Dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        groups = json.loads(meta["param_groups"])
        values = json.loads(meta.get("state_values", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt metadata ({e})") from None
    state: Dict[Any, Dict[str, Any]] = {}
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state":
            raise CheckpointError(f"{source}: unexpected tensor '{name}' (expected state.<id>.<key>)")
        state.setdefault(_pid(parts[1]), {})[parts[2]] = t
    for pid, st in values.items():
        state.setdefault(_pid(pid), {}).update(st)
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def optimizer_state_to_safetensors(state_dict: Dict[str, Any], path: os.PathLike | str) -> None:
    """Write an optimizer state dict to one safetensors file (atomically)."""
    tensors, meta = flatten_optimizer_state(state_dict)
    save_safetensors(tensors, path, metadata=meta)


def optimizer_state_from_safetensors(path: os.PathLike | str) -> Dict[str, Any]:
    """Read a state dict written by `optimizer_state_to_safetensors`."""
    meta = safetensors_metadata(path)
    return unflatten_optimizer_state(load_safetensors(path), meta, source=str(path))
