"""Data-parallel scaling: tokens per second and peak memory per GPU on 1..N GPUs (issue 9).

For a Llama-shaped model with random weights (``--shape tinyllama``: TinyLlama-1.1B's hidden 2048,
22 layers, intermediate 5632, 32 heads, 4 KV heads, vocab 32000; ``small`` / ``tiny`` for quick
checks) this runs ``peftlab train`` for each mode on each GPU count, with the same global batch
(per-rank batch = global / n), on the synthetic pretraining corpus packed into full sequences:

  lora_ddp     LoRA r=16 on all linear layers, DDP
  full_fsdp    full fine-tuning, FSDP full sharding (ZeRO-3 style)
  qlora_fsdp   QLoRA (NF4 + double quant, LoRA r=16 all-linear), FSDP full sharding, 4-bit
               weights sharded

From each run's metrics.jsonl it takes the tokens/s over the logged steps after the first
(warm-up and compilation excluded) and from summary.json rank 0's peak GPU memory; scaling
efficiency = tokens/s on n GPUs / (n x tokens/s on 1). It also compares each n-GPU loss trajectory
with the 1-GPU one at the same global batch (max relative difference over the logged steps).
Writes scaling.csv and scaling.md (GPU name, versions, date, commands) under --out and each run's
console output under --out/logs/.

    python experiments/scaling.py --gpus 1 2 4 8 --out experiments/results           # H200s
    python experiments/scaling.py --device cpu --shape tiny --gpus 1 2 --steps 6      # plumbing (gloo)

NCCL runs set NCCL_NVLS_ENABLE=0 (NVLink multicast off, as the device notes ask).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from bench_quant import lib_versions  # noqa: E402

SHAPES = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}
MODES = {
    "lora_ddp": ["method=lora", "distributed=ddp", "peft.r=16", "peft.lora_alpha=32",
                 "peft.target_modules=all-linear"],
    "full_fsdp": ["method=full", "distributed=fsdp", "sharding=full"],
    "qlora_fsdp": ["method=qlora", "quantize=nf4", "distributed=fsdp", "sharding=full", "peft.r=16",
                   "peft.lora_alpha=32", "peft.target_modules=all-linear"],
}


def make_base(shape: str, out: Path) -> Path:
    """A random-weight checkpoint of `shape` with the project tokenizer, saved in HF format."""
    from peftlab.models import LlamaConfig, LlamaForCausalLM, save_pretrained
    from peftlab.tokenizer import Tokenizer

    tok = Tokenizer.load(ROOT / "peftlab" / "assets" / "tokenizer" / "tokenizer.model")
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_id)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=0)
    save_pretrained(model, out, tokenizer=tok)
    return out


def run(mode: str, n: int, base: Path, args, run_dir: Path, log_dir: Path) -> Dict[str, object]:
    """One `peftlab train` run on n processes; returns its measurements (or the error)."""
    per_rank = args.global_batch // n
    config = run_dir.parent / f"{mode}_{n}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"model: {base}\n")
    overrides = [str(config), f"output_dir={run_dir}", f"device={args.device}", "progress=false",
                 f"max_steps={args.steps}", f"log_every={args.log_every}", f"batch_size={per_rank}",
                 "data.task=pretrain", "data.packing=true", f"data.max_length={args.seq}",
                 "data.max_eval_examples=8", "eval_every=0", "save_every=0", "lr=1e-4",
                 "warmup_steps=0", f"dtype={args.dtype}", *MODES[mode]]
    if args.memory_fraction is not None:
        overrides.append(f"max_gpu_memory_fraction={args.memory_fraction}")
    if n == 1:   # the single-process reference: same global batch, no wrapper
        overrides = [o for o in overrides if not o.startswith(("distributed=", "sharding="))]
        cmd = [sys.executable, "-m", "peftlab", "train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "peftlab", "train", *overrides]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=str(ROOT))
    row: Dict[str, object] = dict(mode=mode, gpus=n, per_rank_batch=per_rank, cmd=" ".join(cmd[1:]))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=args.timeout)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"scaling_{mode}_{n}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        row["error"] = proc.stdout.strip().splitlines()[-1][:200] if proc.stdout.strip() else "failed"
        return row
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    first, last = logged[0], logged[-1]
    if last["time"] > first["time"]:
        row["tokens_per_s"] = round((last["tokens"] - first["tokens"]) / (last["time"] - first["time"]), 1)
    row["losses"] = {r["step"]: r["loss"] for r in logged}
    summary = json.loads((run_dir / "summary.json").read_text())
    row["peak_gib"] = summary.get("peak_gpu_memory_gib")
    return row


def versions() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    libs = "; ".join(f"{k} {v}" for k, v in lib_versions().items() if k != "bitsandbytes")
    return f"{gpu}; {libs}; {datetime.date.today()}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--shape", default="tinyllama", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="weights' dtype (float32 on the CPU)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="cap each process's GPU memory (max_gpu_memory_fraction): with a cap that one "
                         "GPU cannot train under, the n-GPU rows show what sharding makes fit")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.dtype == "bfloat16":
        args.dtype = "float32"
    if any(args.global_batch % n for n in args.gpus):
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by every --gpus value")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(args.shape, Path(tmp) / "base")
        for mode in args.modes:
            for n in sorted(set(args.gpus)):
                r = run(mode, n, base, args, Path(tmp) / "runs" / f"{mode}_{n}", out / "logs")
                rows.append(r)
                print({k: v for k, v in r.items() if k not in ("losses", "cmd")}, flush=True)
    for r in rows:   # efficiency and loss agreement against the same mode on one GPU
        one = next((o for o in rows if o["mode"] == r["mode"] and o["gpus"] == 1), None)
        if one and "tokens_per_s" in r and "tokens_per_s" in one:
            r["efficiency"] = round(r["tokens_per_s"] / (r["gpus"] * one["tokens_per_s"]), 3)
        if one and "losses" in r and "losses" in one and r is not one:
            common = [s for s in r["losses"] if s in one["losses"]]
            diff = max((abs(r["losses"][s] - one["losses"][s]) / abs(one["losses"][s]) for s in common),
                       default=None)
            r["max_rel_loss_diff"] = None if diff is None else float(f"{diff:.3g}")
    cols = ["mode", "gpus", "per_rank_batch", "tokens_per_s", "efficiency", "peak_gib",
            "max_rel_loss_diff", "error"]
    header = (f"{versions()}; shape {args.shape}; global batch {args.global_batch} x seq {args.seq}; "
              f"{args.steps} steps; dtype {args.dtype}")
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["cmd"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Data-parallel scaling\n\n{header}\n", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
