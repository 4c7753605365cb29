"""Training run configuration: YAML files validated against dataclasses.

    peftlab train experiments/configs/lora_qa.yaml lr=2e-3 peft.r=16

A YAML file maps onto `TrainConfig` (nested `data:` onto `DataConfig`, `peft:` onto the method's
own config class: `LoraConfig`, `PromptTuningConfig`, ...). Unknown keys anywhere are errors that
list the valid keys; `key=value` overrides on the command line are parsed as YAML scalars and go
through the same checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from ..configs import from_dict
from ..data.world_tasks import TASK_FORMATS
from ..errors import ConfigError

METHODS = ("full", "lora", "dora", "qlora", "freeze", "bitfit", "prompt_tuning", "p_tuning", "prefix_tuning")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = (*TASK_FORMATS, "pretrain")  # data.task: the synthetic world's tasks, or its pretraining corpus


@dataclass
class DataConfig:
    """Where examples come from and how they become token sequences.

    Either `task` (a synthetic-world task generated in memory: cloze, qa, dialogue, classify,
    data2text, skills, or `pretrain` for the plain-text corpus) or `train_file` (Alpaca, ShareGPT,
    OpenAI messages or {"text"} records, JSON or JSONL). Evaluation uses `eval_file`, else the
    task's `eval_split`; with neither there is no evaluation.
    """

    task: Optional[str] = None
    world_seed: int = 0
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    format: str = "auto"
    template: str = "default"
    max_length: int = 256
    packing: bool = False
    skip_invalid: bool = False
    eval_split: str = "validation"
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 200


@dataclass
class TrainConfig:
    """One training run. `model` is a checkpoint directory or a shipped base name ("tiny", "small",
    "small-bias"); `model_config` instead builds a fresh model (pretraining from scratch)."""

    model: Optional[str] = None
    model_config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None
    method: str = "full"
    peft: Dict[str, Any] = field(default_factory=dict)
    quantize: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/run"
    export_dir: Optional[str] = None
    save_dtype: Optional[str] = None
    seed: int = 0
    max_steps: int = 100
    max_minutes: Optional[float] = None
    batch_size: int = 8            # examples per micro-batch on each rank (process)
    grad_accum: int = 1
    global_batch_size: Optional[int] = None  # examples per optimizer step over all ranks; see for_world
    optimizer: str = "adamw"
    lr: float = 1e-3
    lora_plus_ratio: Optional[float] = None
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    dtype: str = "float32"
    autocast: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    max_gpu_memory_fraction: Optional[float] = None  # CUDA: cap this process's allocations (0, 1]
    eval_every: int = 0
    eval_generate: bool = True
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 32
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = True
    progress: bool = True
    distributed: str = "none"      # none | ddp | fsdp (under torchrun); see train/distributed.py
    sharding: str = "full"         # fsdp only: grad_op (ZeRO-2-like) | full (ZeRO-3-like)
    export_merged: bool = False    # LoRA-family runs also write run_dir/merged (HF, base + adapter)

    def validate(self, source: str = "config") -> None:
        if self.method not in METHODS:
            raise ConfigError(f"{source}: field 'method': '{self.method}' is not one of {', '.join(METHODS)}")
        if (self.model is None) == (self.model_config is None):
            raise ConfigError(f"{source}: give exactly one of 'model' (a checkpoint) or 'model_config' "
                              "(a fresh model)")
        if self.data.task is None and self.data.train_file is None:
            raise ConfigError(f"{source}: field 'data': give 'task' or 'train_file'")
        if self.data.task is not None and self.data.task not in TASKS:
            raise ConfigError(f"{source}: field 'data.task': '{self.data.task}' is not one of {', '.join(TASKS)}")
        if self.data.eval_split not in ("train", "validation", "test"):
            raise ConfigError(f"{source}: field 'data.eval_split': '{self.data.eval_split}' is not one of "
                              "train, validation, test")
        if self.save_dtype is not None and (self.save_dtype not in DTYPES or self.method != "full"):
            raise ConfigError(f"{source}: field 'save_dtype': '{self.save_dtype}' needs method 'full' (the exported "
                              f"checkpoint's dtype) and one of {', '.join(DTYPES)}")
        f = self.max_gpu_memory_fraction
        if f is not None and not (0 < f <= 1):
            raise ConfigError(f"{source}: field 'max_gpu_memory_fraction' must be in (0, 1], got {f}")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{source}: field 'lr' must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "constant", "linear"):
            raise ConfigError(f"{source}: field 'schedule': '{self.schedule}' is not one of cosine, constant, linear")
        if self.optimizer not in ("adamw", "paged_adamw", "paged_adamw8bit", "sgd"):
            raise ConfigError(f"{source}: field 'optimizer': '{self.optimizer}' is not one of "
                              "adamw, paged_adamw, paged_adamw8bit, sgd")
        if self.quantize not in (None, "nf4", "fp4"):
            raise ConfigError(f"{source}: field 'quantize': '{self.quantize}' is not one of nf4, fp4")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{source}: field 'dtype': '{self.dtype}' is not one of float32, bfloat16, float16")
        if self.autocast not in ("auto", "none", "bfloat16", "float16"):
            raise ConfigError(f"{source}: field 'autocast': '{self.autocast}' is not one of auto, none, bfloat16, float16")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"{source}: field 'distributed': '{self.distributed}' is not one of none, ddp, fsdp")
        if self.sharding not in ("grad_op", "full"):
            raise ConfigError(f"{source}: field 'sharding': '{self.sharding}' is not one of grad_op, full")
        if self.export_merged and (self.method not in ("lora", "qlora", "dora", "freeze", "bitfit") or self.model is None):
            raise ConfigError(f"{source}: field 'export_merged' needs an adapter method (lora, qlora, dora, freeze, "
                              f"bitfit) on a base checkpoint ('model'), got method '{self.method}'")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"{source}: field 'global_batch_size' must be >= 1, got {self.global_batch_size}")

    def for_world(self, world_size: int, source: str = "config") -> "TrainConfig":
        """This config for `world_size` ranks: `batch_size` is per rank, so one optimizer step sees
        batch_size x grad_accum x world_size examples. With `global_batch_size` set, grad_accum is
        derived from it (which needs batch_size x world_size to divide it, and an explicit
        grad_accum other than 1 to agree)."""
        if self.global_batch_size is None:
            return self
        per_pass = self.batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ConfigError(f"{source}: field 'global_batch_size' ({self.global_batch_size}) is not divisible by "
                              f"batch_size x world size = {self.batch_size} x {world_size} = {per_pass}")
        accum = self.global_batch_size // per_pass
        if self.grad_accum not in (1, accum):
            raise ConfigError(f"{source}: field 'grad_accum' ({self.grad_accum}) disagrees with global_batch_size "
                              f"{self.global_batch_size} = batch_size {self.batch_size} x world size {world_size} "
                              f"x grad_accum {accum}; give one of the two")
        return dataclasses.replace(self, grad_accum=accum)


def _parse_override(item: str, source: str):
    if "=" not in item:
        raise ConfigError(f"{source}: override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(d: Dict[str, Any], overrides: List[str], source: str = "command line") -> Dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (validated later by `from_dict`)."""
    for item in overrides:
        path, value = _parse_override(item, source)
        node = d
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{item}': '{p}' is not a section")
        node[path[-1]] = value
    return d


def load_train_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                      base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Read YAML (or start from `base`), apply overrides, and validate strictly."""
    source = str(path) if path else "config"
    d: Dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        d.update(loaded)
    d = apply_overrides(d, overrides or [], source)
    cfg = from_dict(TrainConfig, d, source)
    cfg.validate(source)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
