"""One training loop for every method (full, LoRA, DoRA, QLoRA, freeze, BitFit, prompt methods).

    for step in range(start, max_steps):
        lr_t = lr · schedule(step)                       warmup, then cosine / linear / constant
        g    = Σ_micro ∇ [Σ_tokens CE] / N_tokens(step)   gradient accumulation, exact token mean
        g    = g · min(1, max_norm / ||g||)              clipping
        θ    = AdamW(θ, g, lr_t)                         only parameters with requires_grad
        every eval_every: loss, perplexity, exact-match accuracy;  every save_every: checkpoint

AdamW is Loshchilov & Hutter 2019 (arXiv 1711.05101, Algorithm 2: decoupled weight decay); the
cosine schedule is SGDR's (Loshchilov & Hutter 2017, arXiv 1608.03983, eq. 5) without restarts,
lr_t = lr · (m + (1 - m) · (1 + cos(π · progress)) / 2) with m = min_lr_ratio.

The loss is normalised by the number of target tokens in the whole optimizer step (all
micro-batches, all ranks), so accumulation and data parallelism reproduce the large-batch step.
Each micro-batch's loss is `linear_ce.causal_lm_loss_sum`: output head and cross-entropy fused in
row chunks, never the whole [B, T, vocab] logits tensor, unless the head cannot be applied apart
from the model (a LoRA or 4-bit head, FSDP, a trainable head under DDP: `output_head`'s rules).
A non-finite loss stops the run with `TrainingError` before anything is written, leaving the
last good checkpoint intact. Metrics go to `run_dir/metrics.jsonl`; a resumed run drops the rows
of the steps after its checkpoint and logs them again. With `max_minutes` the run stops after
the step that passes the limit (and saves a checkpoint there when `save_every` is set).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, TrainingError
from ..fileio import atomic_write, write_json
from .batches import StepSampler
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DTYPES, TrainConfig, to_yaml
from .evaluate import _autocast, evaluate_accuracy, evaluate_loss
from .linear_ce import causal_lm_loss_sum

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_BASES = ("tiny", "small", "small-bias")


def resolve_model_path(name: str) -> Path:
    """A shipped base name ("tiny", "small", "small-bias") or a checkpoint directory."""
    if name in SHIPPED_BASES:
        return ASSETS / f"base-{name}"
    return Path(name)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' requested but CUDA is not available")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device '{spec}' is not a device name (auto, cpu, cuda, cuda:1, ...)") from None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return lo + (1 - lo) * (1 - progress)
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


# --- building blocks --------------------------------------------------------------------------
def build_model(cfg: TrainConfig, device: torch.device):
    """The base model and tokenizer: loaded from a checkpoint, or fresh from `model_config`."""
    from ..models import LlamaConfig, LlamaForCausalLM, load_pretrained
    from ..tokenizer import Tokenizer

    dtype = DTYPES[cfg.dtype]
    if cfg.model is not None:
        path = resolve_model_path(cfg.model)
        model, tok = load_pretrained(path, dtype=dtype, device=device, quantize=cfg.quantize)
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
    else:
        from ..configs import from_dict

        mcfg = from_dict(LlamaConfig, dict(cfg.model_config), "model_config")
        model = LlamaForCausalLM(mcfg).reset_parameters(seed=cfg.seed).to(device=device, dtype=dtype)
        model.name_or_path = None
        if not cfg.tokenizer:
            raise ConfigError("config: a fresh model ('model_config') needs 'tokenizer' (a tokenizer.model path)")
        tok = Tokenizer.load(cfg.tokenizer)
    if tok is None:
        raise ConfigError(f"config: no tokenizer.model in '{cfg.model}' and no 'tokenizer' given")
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"config: tokenizer {tok.source} has {tok.vocab_size} tokens but the model's embedding "
                          f"has {model.config.vocab_size} rows (vocab_size); ids past it cannot be embedded")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


def method_config(cfg: TrainConfig):
    """The PEFT config object for `cfg.method` built from `cfg.peft` (None for full fine-tuning)."""
    from ..configs import from_dict

    peft = dict(cfg.peft)
    where = "config: section 'peft'"
    if cfg.method == "full":
        if peft:
            raise ConfigError(f"{where}: method 'full' takes no peft settings, got {sorted(peft)}")
        return None
    from ..tuners import config as C

    if cfg.method in ("lora", "qlora", "dora"):
        if cfg.method == "dora":
            peft.setdefault("use_dora", True)
        return from_dict(C.LoraConfig, peft, where)
    cls = {"freeze": C.FreezeConfig, "bitfit": C.BitFitConfig, "prompt_tuning": C.PromptTuningConfig,
           "p_tuning": C.PTuningConfig, "prefix_tuning": C.PrefixTuningConfig}[cfg.method]
    return from_dict(cls, peft, where)


def apply_method(model: nn.Module, cfg: TrainConfig, tokenizer=None) -> nn.Module:
    from ..tuners import get_peft_model

    if cfg.method == "qlora" and cfg.quantize is None:
        raise ConfigError("config: method 'qlora' needs 'quantize: nf4' (or fp4)")
    pc = method_config(cfg)
    if pc is None:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        return model
    if hasattr(pc, "tokenizer") and getattr(pc, "tokenizer", None) is None and tokenizer is not None:
        pc.tokenizer = tokenizer
    return get_peft_model(model, pc)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"config: method '{cfg.method}' left no trainable parameters")
    groups: Any = params
    if cfg.lora_plus_ratio:
        from ..tuners.lora import lora_plus_param_groups

        groups = lora_plus_param_groups(model, lr=cfg.lr, ratio=cfg.lora_plus_ratio, weight_decay=cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # CPU: the single-tensor loop (the reference trajectory); GPU: the fused kernel
        on_cuda = params[0].is_cuda
        return torch.optim.AdamW(groups, foreach=False, fused=True if on_cuda else None, **kw)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from ..optim import PagedAdamW

    return PagedAdamW(groups, state_bits=8 if cfg.optimizer == "paged_adamw8bit" else 32, **kw)


def load_examples(cfg: TrainConfig, split: str):
    """Examples of the train or eval split, from a synthetic task or a file."""
    from ..data.formats import load_dataset
    from ..data.synthworld import load_task

    d = cfg.data
    if d.task == "pretrain" and not (d.train_file if split == "train" else d.eval_file):
        from .pretrain import pretrain_corpus

        return pretrain_corpus(d.world_seed, "train" if split == "train" else "validation")
    if split == "train":
        if d.train_file:  # a list that carries the file's LoadReport (`.report`)
            return load_dataset(d.train_file, format=d.format, skip_invalid=d.skip_invalid)
        return list(load_task(d.task, "train", seed=d.world_seed))
    if d.eval_file:
        return load_dataset(d.eval_file, format=d.format, skip_invalid=d.skip_invalid)
    if d.task:
        return list(load_task(d.task, d.eval_split, seed=d.world_seed))
    return []


def encode_all(examples, tokenizer, cfg: TrainConfig) -> List[Dict[str, List[int]]]:
    """Token features of `examples`; examples that truncation leaves without a trained token are
    counted in a warning (TokenizedDataset.from_examples)."""
    from ..data.collate import TokenizedDataset

    d = cfg.data
    if d.packing:  # documents are cut into max_length chunks, so none is truncated first
        ds = TokenizedDataset.from_examples(tokenizer, examples, d.template, pack_to=d.max_length)
    else:
        ds = TokenizedDataset.from_examples(tokenizer, examples, d.template, max_length=d.max_length)
    return ds.features


class MetricsLog:
    """Append-only JSONL metrics (one object per line, flushed each write)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only the rows of steps <= `step` (none for 0): a resumed run re-runs the steps after
        its checkpoint and logs them again. A line cut short by a kill is dropped too."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line + "\n")
        with atomic_write(self.path, "w") as f:
            f.writelines(keep)


# --- the run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    tokenizer: Any
    losses: List[float]
    eval: Dict[str, Any]
    steps: int
    seconds: float


def train(cfg: TrainConfig, log=print, dist=None) -> RunResult:
    """Run training as configured; resumes from the newest checkpoint in output_dir if any."""
    from ..tuners import trainable_parameters_report

    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    cfg = cfg.for_world(world)  # resolves global_batch_size into grad_accum
    is_main = rank == 0
    device = dist.device if dist else resolve_device(cfg.device)
    if cfg.max_gpu_memory_fraction is not None:  # e.g. to show what fits on n GPUs but not on one
        if device.type != "cuda":
            raise ConfigError(f"config: max_gpu_memory_fraction needs a CUDA device, got '{device}'")
        torch.cuda.set_per_process_memory_fraction(cfg.max_gpu_memory_fraction, device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml", "w") as f:
            f.write(to_yaml(cfg))
    model, tok = build_model(cfg, device)
    model = apply_method(model, cfg, tok)
    if is_main:
        log(f"[peftlab] method={cfg.method} " + trainable_parameters_report(model))
        if cfg.quantize:
            from ..quant.report import format_quantization_report

            log(f"[peftlab] {format_quantization_report(model)}")
    train_examples = load_examples(cfg, "train")
    eval_examples = load_examples(cfg, "eval")
    skipped = [r.summary() for r in (getattr(train_examples, "report", None), getattr(eval_examples, "report", None))
               if r is not None and r.n_skipped]
    for line in skipped if is_main else []:
        log(f"[peftlab] skip_invalid: {line}")
    if cfg.data.max_train_examples:
        train_examples = train_examples[: cfg.data.max_train_examples]
    if cfg.data.max_eval_examples:
        eval_examples = eval_examples[: cfg.data.max_eval_examples]
    encoded = encode_all(train_examples, tok, cfg)
    targets = torch.tensor([sum(1 for t in e["labels"][1:] if t != -100) for e in encoded])
    if int(targets.sum()) == 0:
        raise ConfigError(f"config: no training example keeps a trained token within data.max_length="
                          f"{cfg.data.max_length}; raise max_length")
    eval_encoded = encode_all(eval_examples, tok, cfg) if eval_examples else []
    if dist is not None:
        model = dist.wrap(model, cfg)
    optimizer = build_optimizer(model, cfg)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    sampler = StepSampler(len(encoded), cfg.batch_size, cfg.grad_accum, cfg.seed, rank, world)
    from ..data.collate import Collator

    collate = Collator(tok.pad_id, padding_side="right")
    autocast_dtype = _autocast_dtype(cfg, device)

    start = 0
    resumed = None
    tokens_before = 0  # tokens (all ranks) of the steps before `start`
    if cfg.resume:
        ck = dist.latest_checkpoint(run_dir) if dist else latest_checkpoint(run_dir)
        if ck is not None:
            state = dist.load_checkpoint(ck, model, optimizer) if dist else load_checkpoint(ck, model, optimizer)
            start, resumed = int(state["step"]), ck
            tokens_before = int(state.get("tokens_seen", 0))
            if is_main:
                log(f"[peftlab] resumed from {ck} at step {start}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    if is_main:
        metrics.truncate(start)  # rows of steps after the checkpoint are about to be run again

    params = [p for p in model.parameters() if p.requires_grad]
    losses: List[float] = []
    tokens_seen = 0  # this rank's, since `start`

    def tokens_total() -> int:  # collective under torchrun
        return tokens_before + (int(dist.all_reduce_sum(tokens_seen)) if dist else tokens_seen)

    def save(step: int) -> None:
        extra = {"tokens_seen": tokens_total(), "method": cfg.method}
        if dist:
            dist.save_checkpoint(run_dir, step, model, optimizer, extra, cfg.keep_checkpoints)
        else:
            save_checkpoint(run_dir, step, model, optimizer, extra, cfg.keep_checkpoints)

    t0 = time.time()
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {cfg.method}", dynamic_ncols=True)
    model.train()
    for step in range(start, cfg.max_steps):
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, cfg)
        n_target = sum(int(targets[idx].sum()) for idx in sampler.global_micro_batches(step))
        step_loss = 0.0
        micro = sampler.micro_batches(step)
        for k, idx in enumerate(micro):
            batch = collate([encoded[i] for i in idx])
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            sync = dist.no_sync(model) if (dist and k < len(micro) - 1) else contextlib.nullcontext()
            with sync:
                with _autocast(device, autocast_dtype):  # fused head + CE where the model allows it
                    loss_sum, _ = causal_lm_loss_sum(model, ids, labels)
                loss = loss_sum / max(n_target, 1) * world  # DDP averages gradients over ranks
                loss.backward()
            step_loss += float(loss_sum.detach())
            tokens_seen += int(batch["attention_mask"].sum())
        if dist:
            step_loss = dist.all_reduce_sum(step_loss)
        step_loss /= max(n_target, 1)
        if not math.isfinite(step_loss):
            ck = latest_checkpoint(run_dir)
            raise TrainingError(f"step {step}: loss is {step_loss}; stopping. Last good checkpoint: "
                                f"{ck if ck else 'none (no checkpoint was saved yet)'}")
        grad_norm = _clip(model, params, cfg.max_grad_norm, dist)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.max_steps):
            tokens = tokens_total()
            metrics.write({"step": done, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": grad_norm, "epoch": round(sampler.epoch_of(done), 4),
                           "tokens": tokens, "time": round(time.time() - t0, 3)})
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps and eval_examples:
            ev = run_eval(model, tok, eval_examples, eval_encoded, cfg, device, autocast_dtype, dist)
            metrics.write({"step": done, **{f"eval_{k}": v for k, v in ev.items() if k != "samples"}})
        out_of_time = False
        if cfg.max_minutes is not None and done != cfg.max_steps:
            elapsed = time.time() - t0
            if dist:  # rank 0's clock, so that every rank stops after the same step
                elapsed = dist.broadcast_float(elapsed)
            out_of_time = elapsed > 60 * cfg.max_minutes
        if out_of_time:
            if is_main:
                log(f"[peftlab] max_minutes={cfg.max_minutes} reached after step {done}; stopping early")
            metrics.write({"step": done, "stopped_early": True, "reason": "max_minutes"})
            if cfg.save_every:  # resumable from here
                save(done)
            break
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
            save(done)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    steps = start + len(losses)
    ev: Dict[str, Any] = {}
    if eval_examples:
        ev = run_eval(model, tok, eval_examples, eval_encoded, cfg, device, autocast_dtype, dist)
        metrics.write({"step": steps, **{f"eval_{k}": v for k, v in ev.items() if k != "samples"}})
    if is_main:
        peak = (round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None)
        write_json(run_dir / "summary.json", {"steps": steps, "final_loss": losses[-1] if losses else None,
                                              "train_seconds": round(seconds, 2), "resumed_from": str(resumed) if resumed else None,
                                              "peak_gpu_memory_gib": peak,  # this rank's (rank 0)
                                              "skipped_records": skipped, "eval": {k: v for k, v in ev.items()}})
    final = dist.unwrap(model) if dist else model
    return RunResult(run_dir, final, tok, losses, ev, steps, seconds)


def run_eval(model, tok, examples, encoded, cfg, device, autocast_dtype, dist=None) -> Dict[str, Any]:
    target = dist.unwrap(model) if dist else model
    out = dict(evaluate_loss(target, tok, examples, cfg.data.template, cfg.data.max_length, cfg.eval_batch_size,
                             device, autocast_dtype, encoded=encoded))
    if cfg.eval_generate and examples and not examples[0].is_text:
        out.update(evaluate_accuracy(target, tok, examples, cfg.data.template, cfg.eval_max_new_tokens,
                                     cfg.eval_batch_size, device, autocast_dtype))
    return out


def _clip(model, params, max_norm, dist) -> float:
    if dist and hasattr(dist, "clip_grad_norm"):  # sharded gradients need a global norm (None: no clip)
        return float(dist.clip_grad_norm(model, max_norm))
    if max_norm is None:
        norm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in params if p.grad is not None))
        return float(norm)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.autocast == "none":
        return None
    if cfg.autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" and cfg.dtype == "float32" else None
    return DTYPES[cfg.autocast]
