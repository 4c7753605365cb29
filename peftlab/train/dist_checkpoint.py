"""Sharded training checkpoints: torch.distributed.checkpoint (DCP) over safetensors + JSON.

    run_dir/checkpoints/step-000200/
        dcp/index.json                 every tensor: dtype, global shape, and its chunks
                                       (offsets, sizes, file, key) -- the DCP metadata, as JSON
        dcp/rank-00000.safetensors     the chunks rank 0 wrote (its FSDP shards; replicated DDP
        dcp/rank-00001.safetensors     tensors are written once, spread over the ranks)
        optimizer.json                 param groups, keyed by parameter name
        rng-rank00000.safetensors      each rank's generator states
        state.json                     step, tokens seen, "format": "dcp", world size, mode
    run_dir/checkpoints/LATEST         name of the newest complete checkpoint

What is saved is the trainable state only, as in the single-process format (checkpoint.py): the
trainable parameters (`model.<name>`) and the optimizer state (`optim.state.<name>.<key>`, e.g.
exp_avg), both from `torch.distributed.checkpoint.state_dict`, so names do not depend on the
wrapper (no `module.` prefix) and a tensor sharded by FSDP is a DTensor. DCP plans who writes
which chunk and, on load, which byte ranges each rank reads, so a checkpoint written by N ranks
resumes on M ranks, and under DDP or FSDP alike.

DCP's own FileSystemWriter records its metadata with pickle and can store values with
torch.save. Here a small StorageWriter / StorageReader pair keeps DCP's planning but writes the
chunks as safetensors and the metadata as JSON, so nothing on disk is ever unpickled. Only
tensors are accepted (non-tensor optimizer values go to optimizer.json).

A checkpoint is assembled in `checkpoints/.step-N.tmp`, renamed into place by rank 0 once every
rank has written, and LATEST is updated after (checkpoint.publish_checkpoint), so a run killed
at any moment leaves the previous checkpoint loadable. The folder must be on a file system that
every rank sees (one machine, or a shared file system across nodes).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..errors import CheckpointError
from ..fileio import load_safetensors, read_json, safetensors_header, save_safetensors, write_json
from .checkpoint import _rng_state, _set_rng_state, publish_checkpoint

FORMAT = "peftlab-dcp-safetensors/1"
INDEX = "index.json"


def _dtype(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dt


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class _AtPath:
    """A storage plugin bound to one folder (DCP's checkpoint_id, when given, replaces it)."""

    def __init__(self, path) -> None:
        super().__init__()
        self.path = Path(path)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


class SafetensorsWriter(_AtPath, StorageWriter):
    """DCP storage: each rank's chunks in one safetensors file, the metadata in index.json."""

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        import dataclasses

        return [dataclasses.replace(p, storage_data=f"rank-{i:05d}.safetensors") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner) -> Future:
        file, tensors, results = plan.storage_data, {}, []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CheckpointError(f"{self.path}: '{item.index.fqn}' is not a tensor; only tensors are "
                                      "saved in the sharded checkpoint")
            t = planner.resolve_data(item).detach()
            offsets = list(item.index.offset or [])
            key = item.index.fqn + ("" if not any(offsets) else "@" + ",".join(map(str, offsets)))
            tensors[key] = t
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data=(file, key)))
        if tensors:
            save_safetensors(tensors, self.path / file)
        return _done(results)

    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        where = {(r.index.fqn, tuple(r.index.offset or ())): r.storage_data for rs in results for r in rs}
        entries: Dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.path}: '{fqn}' is not a tensor")
            chunks = []
            for c in md.chunks:
                file, key = where[(fqn, tuple(c.offsets))]
                chunks.append({"offsets": list(c.offsets), "sizes": list(c.sizes), "file": file, "key": key})
            entries[fqn] = {"dtype": str(md.properties.dtype).replace("torch.", ""), "shape": list(md.size),
                            "chunks": chunks}
        write_json(self.path / INDEX, {"format": FORMAT, "tensors": entries})

    def storage_meta(self):
        return None


def read_index(path) -> Dict[str, Any]:
    """The JSON metadata of a sharded checkpoint folder, checked (CheckpointError names the file)."""
    path = Path(path)
    index = read_json(path / INDEX, "sharded checkpoint index")
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("tensors"), dict):
        raise CheckpointError(f"{path / INDEX}: not a {FORMAT} index")
    headers: Dict[str, Dict[str, Any]] = {}  # a truncated file is named here, not deep inside DCP
    for fqn, e in index["tensors"].items():
        try:
            _dtype(e["dtype"], f"{path / INDEX}: tensor '{fqn}'")
            for c in e["chunks"]:
                if len(c["offsets"]) != len(e["shape"]) or len(c["sizes"]) != len(e["shape"]):
                    raise ValueError("chunk rank")
                if not (path / c["file"]).is_file():
                    raise CheckpointError(f"{path / c['file']}: missing (holds '{fqn}')")
                if c["file"] not in headers:
                    headers[c["file"]] = safetensors_header(path / c["file"])
                if c["key"] not in headers[c["file"]]:
                    raise CheckpointError(f"{path / c['file']}: has no tensor '{c['key']}' (a chunk of '{fqn}')")
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path / INDEX}: malformed entry for tensor '{fqn}'") from None
    return index


class SafetensorsReader(_AtPath, StorageReader):
    """Reads what SafetensorsWriter wrote; each rank reads only the byte ranges it needs."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        index = read_index(self.path)
        md, storage = {}, {}
        for fqn, e in index["tensors"].items():
            chunks = []
            for c in e["chunks"]:
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
                storage[MetadataIndex(fqn, c["offsets"])] = (c["file"], c["key"])
            md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_dtype(e["dtype"], fqn)),
                                            size=torch.Size(e["shape"]), chunks=chunks)
        return Metadata(state_dict_metadata=md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner) -> Future:
        from safetensors import safe_open

        by_file: Dict[str, list] = {}
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise CheckpointError(f"{self.path}: '{item.dest_index.fqn}' is not a tensor")
            by_file.setdefault(self.storage[item.storage_index][0], []).append(item)
        for file, items in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                for item in items:
                    key = self.storage[item.storage_index][1]
                    region = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                    src = f.get_slice(key)[region] if region else f.get_tensor(key)
                    dst = planner.resolve_tensor(item).detach()
                    if dst.shape != src.shape:
                        raise CheckpointError(f"{self.path / file}: '{key}' gives a chunk of shape {tuple(src.shape)} "
                                              f"where {tuple(dst.shape)} is needed")
                    dst.copy_(src)
                    planner.commit_tensor(item, dst)
        return _done(None)


def _flat_keys(state: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_sharded(path, state: Dict[str, Any]) -> None:
    """Collective: every rank calls it with its (possibly sharded) nested dict of tensors."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=SafetensorsWriter(path), no_dist=not tdist.is_initialized())


def load_sharded(path, state: Dict[str, Any]) -> None:
    """Collective: fill `state` (nested dict of tensors / DTensors, as saved) in place from `path`."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    saved = read_index(path)["tensors"]
    want = _flat_keys(state)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path / INDEX}: does not match this run's trainable state (missing "
                              f"{missing[:4]}, unexpected {extra[:4]}); was it written with another method or config?")
    for k, t in want.items():
        if list(t.shape) != saved[k]["shape"]:
            raise CheckpointError(f"{path / INDEX}: tensor '{k}' has shape {tuple(saved[k]['shape'])}, this run "
                                  f"has {tuple(t.shape)}")
    try:
        dcp.load(state, storage_reader=SafetensorsReader(path), no_dist=not tdist.is_initialized())
    except dcp.CheckpointException as e:  # DCP gathers the ranks' failures; name ours
        ours = [f for f in e.failures.values() if isinstance(f, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint: {e}") from None


# --- training checkpoints ---------------------------------------------------------------------
def _split_optimizer_state(osd: Dict[str, Any]) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:
    """{"state": {name: {key: value}}} -> (tensor leaves, JSON-able leaves "name|key")."""
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    scalars: Dict[str, Any] = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors.setdefault(name, {})[k] = v
            else:
                scalars[f"{name}|{k}"] = v
    return tensors, scalars


def _state_dicts(model, optimizer):
    """(trainable parameters by name, optimizer state dict by name). `model` is the unwrapped module
    (FSDP shards it in place: its trainable parameters are DTensors); the tensors are the live
    ones (detached), so loading into them restores the run."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    msd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return msd, get_optimizer_state_dict(model, optimizer)


def save_training_checkpoint(run_dir, step: int, model, optimizer, extra: Dict[str, Any], keep: int,
                             info: Dict[str, Any]) -> Path:
    """Collective; `model` unwrapped (see _state_dicts). `info` (world size, mode) goes to state.json."""
    rank = tdist.get_rank()
    ckdir = Path(run_dir) / "checkpoints"
    tmp = ckdir / f".step-{step:06d}.tmp"
    if rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tdist.barrier()
    msd, osd = _state_dicts(model, optimizer)
    tensors, scalars = _split_optimizer_state(osd)
    save_sharded(tmp / "dcp", {"model": msd, "optim": {"state": tensors}})
    save_safetensors(_rng_state(), tmp / f"rng-rank{rank:05d}.safetensors")
    tdist.barrier()
    final = ckdir / f"step-{step:06d}"
    if rank == 0:
        write_json(tmp / "optimizer.json", {"param_groups": osd["param_groups"], "scalars": scalars})
        write_json(tmp / "state.json", {"step": step, **extra, "format": "dcp", **info})
        publish_checkpoint(tmp, keep)
    tdist.barrier()
    return final


def load_training_checkpoint(path, model, optimizer) -> Dict[str, Any]:
    """Collective: restore trainable parameters, optimizer state and this rank's generators
    (`model` unwrapped). Returns state.json."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state")
    if state.get("format") != "dcp":
        raise CheckpointError(f"{path}: written by a single-process run (trainable.safetensors); resume it "
                              "without torchrun, or start this distributed run in a fresh output_dir")
    msd, osd = _state_dicts(model, optimizer)  # the targets: this run's shapes and shardings
    tensors, _ = _split_optimizer_state(osd)
    load_sharded(path / "dcp", {"model": msd, "optim": {"state": tensors}})  # parameters: in place
    meta = read_json(path / "optimizer.json", "optimizer state")
    for key, v in meta.get("scalars", {}).items():
        name, k = key.split("|", 1)
        tensors.setdefault(name, {})[k] = v
    try:
        set_optimizer_state_dict(model, optimizer, {"state": tensors, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'optimizer.json'}: cannot restore the optimizer: {e}") from None
    rng = path / f"rng-rank{tdist.get_rank():05d}.safetensors"
    if rng.is_file() and state.get("world_size") == tdist.get_world_size():
        _set_rng_state(load_safetensors(rng))
    return state
