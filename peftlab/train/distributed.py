"""Data-parallel training under torchrun: DDP, and FSDP2 with ZeRO-2 / ZeRO-3 style sharding.

    torchrun --nproc_per_node 8 -m peftlab train CONFIG.yaml distributed=fsdp sharding=full
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m peftlab train ...

Each of the N ranks holds a model replica (DDP) or 1/N of every parameter (FSDP), runs its own
slice of each global micro-batch (StepSampler: rank r takes examples r·b ... r·b + b - 1 of the
N·b), and the gradients are combined so that the step equals the single-process step on the
whole batch. With B = batch_size × grad_accum × N examples per step and T the number of target
tokens over all of them (all ranks, all micro-batches),

    loss_step = (1/T) Σ_ranks Σ_micro Σ_tokens CE          (reported: all-reduced over ranks)
    g         = (1/N) Σ_r ∇_r [N · Σ_micro Σ_tokens CE / T]   each rank scales its loss by N,
                                                            DDP / FSDP average over the N ranks

so N ranks × batch b reproduce 1 rank × batch N·b up to floating-point summation order.

What each rank keeps, for P trainable parameters among Φ in all (ZeRO: Rajbhandari et al. 2020,
arXiv 1910.02054, section 5 and figure 1; FSDP: Zhao et al. 2023, arXiv 2304.11277):

    mode                         parameters      gradients     optimizer state   per step, per rank
    ddp                          Φ               P             P (x2 for Adam)   all-reduce P grads
    fsdp, sharding: grad_op      Φ/N (+ one      P/N           P/N               all-gather Φ once,
      (ZeRO-2 ≈, FSDP2 reshard     group's Φ                                     reduce-scatter P
       _after_forward=False)       unsharded)
    fsdp, sharding: full         Φ/N (+ one      P/N           P/N               all-gather Φ twice
      (ZeRO-3, reshard_after       layer's Φ)                                    (fwd + bwd),
       _forward=True)                                                            reduce-scatter P

docs/distributed.md works out the bytes and seconds for a 7B model on PCIe and NVLink.

FSDP here is FSDP2 (`torch.distributed.fsdp.fully_shard`): each DecoderLayer is one sharding
group and the root (embeddings, final norm, head, prompt encoders) another; parameters become
DTensors sharded on dim 0, frozen and trainable ones side by side. Mixed precision: when the
run uses bf16 autocast (`autocast: auto` on CUDA, or `autocast: bfloat16`), FSDP all-gathers
parameters in bf16 and reduces gradients in fp32 (MixedPrecisionPolicy), while the sharded
master copy of the trainable parameters and the optimizer state stay fp32.

QLoRA under FSDP: fully_shard shards parameters only, so each Linear4bit's packed uint8 weight
is re-registered as a frozen parameter of the compute dtype viewing the same bytes
(`Linear4bit.set_quant_storage`, bitsandbytes' quant_storage). FSDP shards and all-gathers the
bytes like any other parameter (never casting them, since their dtype is FSDP's param_dtype),
and forward reinterprets them as uint8. The quant state (absmax, code tables: ~0.13 bits per
weight with double quantization) is kept whole on every rank.

Gradient accumulation: DDP skips the all-reduce on all but the last micro-batch (no_sync);
FSDP reduce-scatters after every micro-batch so that only the 1/N gradient shard is kept.
Checkpoints are sharded (dist_checkpoint.py); at the end rank 0 gathers the trainable tensors
and writes the adapter (PEFT format) or the full model (HF format), and with `export_merged` the
merged HF checkpoint.

Backend: nccl on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU; PEFTLAB_DIST_BACKEND=nccl|gloo
overrides the choice. Every rank builds the model on its own device before sharding, so the
model (4-bit for QLoRA) must fit on one device while loading; training memory then divides.
Limits: paged optimizers are single-process only; QDoRA (DoRA on a 4-bit base) is not sharded;
dropout masks differ from a single-process run (each rank draws its own).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from ..errors import ConfigError
from .config import DTYPES, TrainConfig

BACKENDS = ("nccl", "gloo")


@dataclass
class LaunchEnv:
    """What torchrun (or any launcher following its conventions) put in the environment."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls, environ=None) -> "LaunchEnv":
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError("environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                              f"(got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r})") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"environment: RANK={rank} is not in 0 .. WORLD_SIZE-1 = {world - 1}")
        return cls(rank, world, local)


def plan_launch(cfg: TrainConfig, env: LaunchEnv, cuda_count: Optional[int] = None,
                backend_override: Optional[str] = None) -> Dict[str, Any]:
    """Check `cfg` against the launch and pick backend and device; raise ConfigError if they clash.

    Returns {"mode", "backend", "device"}. Pure: no process group is created, so every rank
    raises the same error before any collective could hang.
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend_override is None:
        backend_override = os.environ.get("PEFTLAB_DIST_BACKEND") or None
    mode = cfg.distributed
    if env.world_size == 1:
        what = "FSDP shards over several processes" if mode == "fsdp" else "DDP needs several processes"
        raise ConfigError(f"config: field 'distributed': '{mode}' on a single process ({what}); launch with "
                          "`torchrun --nproc_per_node N -m peftlab train ...` or set distributed: none")
    if mode == "none":
        raise ConfigError(f"config: field 'distributed' is 'none' but the launcher started {env.world_size} "
                          "processes (WORLD_SIZE); set distributed: ddp or fsdp, or launch one process")
    cfg.for_world(env.world_size)  # a global batch the world size does not divide
    if cfg.optimizer.startswith("paged"):
        raise ConfigError(f"config: field 'optimizer': '{cfg.optimizer}' is single-process only (it pages whole "
                          "tensors); use adamw under ddp / fsdp, whose optimizer state FSDP shards anyway")
    if mode == "fsdp" and cfg.quantize and (cfg.method == "dora" or cfg.peft.get("use_dora")):
        raise ConfigError("config: DoRA on a 4-bit base (QDoRA) is not supported under fsdp; use ddp")
    if backend_override is not None and backend_override not in BACKENDS:
        raise ConfigError(f"environment: PEFTLAB_DIST_BACKEND='{backend_override}' is not one of {', '.join(BACKENDS)}")
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda_count > 0)
    if backend_override == "gloo" and cfg.device == "auto":
        want_cuda = False
    backend = backend_override or ("nccl" if want_cuda else "gloo")
    if want_cuda and cuda_count == 0:
        raise ConfigError(f"config: field 'device': '{cfg.device}' but CUDA is not available")
    if backend == "nccl" and cuda_count == 0:
        raise ConfigError("the nccl backend needs CUDA GPUs and none is visible; use device: cpu "
                          "(gloo) or PEFTLAB_DIST_BACKEND=gloo")
    if backend == "gloo" and want_cuda:
        raise ConfigError(f"config: device '{cfg.device}' with the gloo backend: gloo has no reduce-scatter on "
                          "GPUs; use nccl (the default on CUDA) or device: cpu")
    if backend == "nccl" and not want_cuda:
        raise ConfigError(f"config: device '{cfg.device}' with the nccl backend: nccl moves GPU tensors only")
    if want_cuda and env.local_rank >= cuda_count:
        raise ConfigError(f"environment: LOCAL_RANK={env.local_rank} but only {cuda_count} GPU(s) are visible; "
                          "use --nproc_per_node <= the number of GPUs")
    device = torch.device("cuda", env.local_rank) if want_cuda else torch.device("cpu")
    return {"mode": mode, "backend": backend, "device": device}


class DistributedRun:
    """The `dist` object the trainer calls (rank, world_size, device, wrap, no_sync, ...)."""

    def __init__(self, cfg: TrainConfig, env: LaunchEnv, plan: Dict[str, Any]):
        self.cfg, self.rank, self.world_size, self.local_rank = cfg, env.rank, env.world_size, env.local_rank
        self.mode, self.backend, self.device = plan["mode"], plan["backend"], plan["device"]
        self.merged: Optional[Path] = None

    @classmethod
    def start(cls, cfg: TrainConfig, env: Optional[LaunchEnv] = None) -> "DistributedRun":
        """Check the launch, then join the process group (MASTER_ADDR/MASTER_PORT from torchrun)."""
        env = env or LaunchEnv.from_environ()
        run = cls(cfg, env, plan_launch(cfg, env))
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        if not tdist.is_initialized():
            extra = {"device_id": run.device} if run.device.type == "cuda" else {}  # NCCL: bind rank to GPU
            tdist.init_process_group(run.backend, rank=env.rank, world_size=env.world_size, **extra)
        return run

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()

    # --- wrapping ---------------------------------------------------------------------------
    def mixed_precision_dtype(self) -> Optional[torch.dtype]:
        from .trainer import _autocast_dtype

        return _autocast_dtype(self.cfg, self.device) if self.mode == "fsdp" else None

    def wrap(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (rotary tables, packed 4-bit weights) are identical on every rank: no re-broadcast
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                     else {"broadcast_buffers": False})
            return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **quiet)
        return shard_model(model, self.device, cfg.sharding == "full", self.mixed_precision_dtype(),
                           DTYPES[cfg.dtype])

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if self.mode == "ddp" else model

    def no_sync(self, model: nn.Module):
        return model.no_sync() if self.mode == "ddp" else contextlib.nullcontext()

    # --- collectives ------------------------------------------------------------------------
    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item())

    def broadcast_float(self, value: float) -> float:
        """Rank 0's `value` on every rank (a time limit must stop all ranks at the same step)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.broadcast(t, src=0)
        return float(t.item())

    def barrier(self) -> None:
        tdist.barrier()

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """The global L2 norm of all gradients; scales them to `max_norm` when it is exceeded.

        FSDP gradients are shards (DTensor, dim 0) that partition each tensor, so
        ||g||² = Σ_ranks Σ_shards ||g_shard||²; DDP gradients are already whole and equal.
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [_local(g) for g in grads]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in local:
            sq += g.detach().float().pow(2).sum()
        if self.mode == "fsdp":
            tdist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm is not None:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in local:
                g.detach().mul_(coef.to(g.dtype))
        return norm

    def reshard(self, model: nn.Module) -> nn.Module:
        """Put every FSDP group back into its sharded state. After a forward without backward
        (evaluation) with reshard_after_forward=False, the whole compute-dtype copies are still
        registered as the module parameters; saving or gathering needs the sharded masters."""
        if self.mode == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        return model

    # --- checkpoints ------------------------------------------------------------------------
    def latest_checkpoint(self, run_dir) -> Optional[Path]:
        from .checkpoint import latest_checkpoint

        return latest_checkpoint(run_dir)

    def save_checkpoint(self, run_dir, step, model, optimizer, extra, keep) -> Path:
        from .dist_checkpoint import save_training_checkpoint

        info = {"world_size": self.world_size, "distributed": self.mode}
        return save_training_checkpoint(run_dir, step, self.reshard(self.unwrap(model)), optimizer, extra, keep, info)

    def load_checkpoint(self, path, model, optimizer) -> Dict[str, Any]:
        from .dist_checkpoint import load_training_checkpoint

        return load_training_checkpoint(path, self.unwrap(model), optimizer)

    # --- the result -------------------------------------------------------------------------
    def gather(self, model: nn.Module, trainable_only: bool = True) -> None:
        """Collective. Afterwards, on rank 0, the (trainable) parameters of the FSDP `model` are
        whole CPU tensors; they are all-gathered one at a time, so no rank ever holds more than
        its shards plus one whole parameter."""
        if self.mode != "fsdp":
            return
        self.reshard(model)
        for mod in list(model.modules()):
            for leaf, p in list(mod._parameters.items()):
                if p is None or not hasattr(p, "full_tensor") or (trainable_only and not p.requires_grad):
                    continue
                whole = p.detach().full_tensor()
                if self.rank == 0:
                    mod._parameters[leaf] = nn.Parameter(whole.cpu(), requires_grad=p.requires_grad)

    def export(self, res, cfg: TrainConfig) -> Optional[Path]:
        """Collective: gather on rank 0, which writes the adapter (PEFT) or model (HF) files."""
        from .export import export_final

        self.gather(res.model, trainable_only=cfg.method != "full")
        out = None
        if self.rank == 0:
            if self.mode == "fsdp" and cfg.method == "full":
                res.model = _plain_copy(res.model)
            out = export_final(res, cfg)
            if cfg.export_merged:  # export_final wrote it
                self.merged = Path(res.run_dir) / "merged"
        self.barrier()
        return out


# --- FSDP ---------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def shard_units(model: nn.Module):
    """The FSDP groups, innermost first: every decoder layer, then the whole model (the root)."""
    from ..models.llama import DecoderLayer

    return [m for m in model.modules() if isinstance(m, DecoderLayer)] + [model]


def prepare_4bit(model: nn.Module, storage: torch.dtype) -> int:
    """Store every Linear4bit's packed bytes as a frozen `storage`-dtype parameter (shardable)."""
    from ..quant.linear4bit import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        m.set_quant_storage(storage)
    return len(layers)


def _check_grad_dtypes(units, mp_dtype: Optional[torch.dtype]) -> None:
    if mp_dtype is not None:
        return  # gradients are all computed in the param dtype
    seen = set()
    for unit in units:
        dtypes = {p.dtype for p in unit.parameters() if p.requires_grad and id(p) not in seen}
        seen.update(id(p) for p in unit.parameters())
        if len(dtypes) > 1:
            raise ConfigError(f"fsdp: trainable parameters of one sharding group ({type(unit).__name__}) mix dtypes "
                              f"{sorted(str(d) for d in dtypes)}, and FSDP reduces a group's gradients together; "
                              "use autocast: bfloat16 (mixed precision), or one dtype")


def shard_model(model: nn.Module, device: torch.device, reshard_after_forward: bool,
                mp_dtype: Optional[torch.dtype], float_dtype: torch.dtype) -> nn.Module:
    """Apply FSDP2 in place: decoder layers, then the root; returns the (same) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    prepare_4bit(model, mp_dtype or float_dtype)  # never cast by FSDP: storage dtype == param dtype
    units = shard_units(model)
    _check_grad_dtypes(units, mp_dtype)
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype else None)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def _plain_copy(model: nn.Module) -> nn.Module:
    """A plain LlamaForCausalLM holding `model`'s (gathered, whole) parameters, for HF export."""
    from ..models.llama import LlamaForCausalLM

    with torch.device("meta"):
        plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(dict(model.named_parameters()), assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.model.inv_freq = model.model.inv_freq.detach().cpu()
    plain.name_or_path = getattr(model, "name_or_path", None)
    return plain


# --- the entry point ------------------------------------------------------------------------------
def run_distributed(cfg: TrainConfig, log=print) -> int:
    """`peftlab train` under torchrun: train on every rank, export on rank 0; returns 0."""
    from .trainer import train

    run = DistributedRun.start(cfg)
    try:
        res = train(cfg, log=log if run.rank == 0 else _quiet, dist=run)
        out = run.export(res, cfg)
        if run.rank == 0:
            from ..cli import _print_eval

            _print_eval(res.eval)
            merged = f", merged: {run.merged}" if run.merged else ""
            log(f"[peftlab] run directory: {res.run_dir}  (final weights: {out}{merged})")
    finally:
        run.close()
    return 0


def _quiet(*args, **kwargs) -> None:
    return None
