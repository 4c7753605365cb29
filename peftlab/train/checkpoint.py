"""Training checkpoints: written atomically, resumed exactly.

    run_dir/checkpoints/step-000200/
        trainable.safetensors     every parameter with requires_grad, under its model name
        optimizer.safetensors     optimizer state tensors  (+ optimizer.json: param groups)
        rng.safetensors           CPU (and CUDA) generator states, so dropout repeats
        state.json                step, tokens seen (all ranks), method
    run_dir/checkpoints/LATEST    name of the newest complete checkpoint

A checkpoint is assembled in a temporary folder and renamed into place only when complete, and
LATEST is rewritten atomically afterwards, so a run killed at any moment leaves the previous
checkpoint loadable. Resuming rebuilds the model from the base and the method config, loads the
trainable tensors and the optimizer state, restores the generators, and continues at the saved
step; since batches are a pure function of the step (see batches.py), the losses repeat exactly.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..fileio import atomic_write, load_safetensors, read_json, save_safetensors, write_json


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split `opt.state_dict()` into flat tensors (`state.<param>.<key>`) and JSON-able groups."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `optimizer_state_to_tensors`: a dict for `opt.load_state_dict`."""
    state: Dict[int, Dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for name, v in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> Dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_rng_state(states: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Dict[str, Any], keep: int = 2) -> Path:
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckdir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
    tensors, meta = optimizer_state_to_tensors(optimizer)
    save_safetensors(tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", meta)
    save_safetensors(_rng_state(), tmp / "rng.safetensors")
    write_json(tmp / "state.json", {"step": step, **extra})
    return publish_checkpoint(tmp, keep)


def publish_checkpoint(tmp: Path, keep: int) -> Path:
    """Rename a complete `checkpoints/.step-N.tmp` folder into place, point LATEST at it and
    delete all but the newest `keep` checkpoints."""
    ckdir, name = tmp.parent, tmp.name[1:-len(".tmp")]
    final = ckdir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with atomic_write(ckdir / "LATEST", "w") as f:
        f.write(name)
    olds = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p.name != name)
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    pointer = ckdir / "LATEST"
    if not pointer.is_file():
        return None
    path = ckdir / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer}: points to '{path.name}', which is incomplete or missing")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore trainable tensors, optimizer state and generators; returns state.json."""
    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state")
    if state.get("format") == "dcp":
        raise CheckpointError(f"{path}: written by a {state.get('world_size')}-process {state.get('distributed')} "
                              "run (sharded DCP format); resume it under torchrun (see train/distributed.py)")
    tensors = load_safetensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise CheckpointError(f"{path / 'trainable.safetensors'}: does not match this run's trainable "
                              f"parameters (missing {missing[:4]}, unexpected {extra[:4]})")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{path / 'trainable.safetensors'}: tensor '{n}' has shape "
                                      f"{tuple(t.shape)}, the model has {tuple(params[n].shape)}")
            params[n].copy_(t)
    meta = read_json(path / "optimizer.json", "optimizer state")
    opt_tensors = load_safetensors(path / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(optimizer_state_from_tensors(opt_tensors, meta))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: cannot restore optimizer: {e}") from None
    _set_rng_state(load_safetensors(path / "rng.safetensors"))
    return state
