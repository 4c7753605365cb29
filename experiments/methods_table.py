"""Claim ("It must learn"): every fine-tuning method learns the synthetic QA task, and the PEFT
methods get most of full fine-tuning's gain with a small share of the parameters.

Setting: the shipped `small` base (7.4M parameters, pretrained from scratch on the synthetic world;
`small-bias` for BitFit, with full fine-tuning repeated there as its reference), the `qa` task
("Where was Ru Dakthorn born?" -> "Vendrath"). Train people only in the train split; the test split
asks about people fine-tuning never mentions, half of it with question templates training never
shows, so the facts must come from pretraining and fine-tuning must teach the format.

    gain  = accuracy_after - accuracy_before           exact match, greedy, all 720 test questions
    share = trainable parameters / base parameters     (LlamaConfig.num_parameters)

Acceptance criteria (checked and written to the table):
  1. LoRA r=8 on q_proj, v_proj reaches >= 90 % of full fine-tuning's gain (mean over seeds) with
     < 1 % of the parameters (2 · 8 layers · r · (256 + 256) = 65,536 = 0.89 %).
  2. QLoRA (NF4 + double quantization, r=8 on all linear layers) is within seed noise of LoRA with
     the same targets on the unquantized (fp32) base: |Δ mean| <= 2 · sqrt(s_a²/n_a + s_b²/n_b),
     s the seed standard deviation (two standard errors of the difference). FP4 is recorded too.

Every method runs from its own YAML (experiments/configs/qa_*.yaml), all of which share data,
steps, batch, schedule and evaluation settings (checked here); only model, method, peft, quantize
and lr differ. Learning rates were chosen per method on the validation split (`--sweep`); the table
is measured on the test split.

    python experiments/methods_table.py --sweep      # lr grid on validation (~25 min on 2 cores)
    python experiments/methods_table.py              # the table on test
    python experiments/methods_table.py --only qa_lora_qv qa_full   # a subset

Resumable: each finished run is one line of experiments/results/methods_table_runs.jsonl (the
sweep: methods_lr_sweep_runs.jsonl) and is skipped when found again; delete a line to redo it.
Writes methods_table.md / .csv (and methods_lr_sweep.md / .csv) under experiments/results/.
Wall times are per run on this CPU with one torch thread by default (`--threads`): on the shared
2-core machine two threads ran 2-9x slower than one whenever another job was running (each op
waits for the descheduled second thread), and ~1.7x faster than one when it was quiet. The load
average at the start of each run is recorded.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runlog import RunCache, environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
RESULTS = ROOT / "experiments" / "results"

# (config name, row label, seeds)
TABLE = [
    ("qa_full", "Full fine-tuning", 3),
    ("qa_lora_qv", "LoRA r=8, q,v", 3),
    ("qa_lora_all", "LoRA r=8, all-linear (QLoRA's unquantized reference)", 3),
    ("qa_dora_qv", "DoRA r=8, q,v", 3),
    ("qa_freeze", "Freeze (train last 2 of 8 layers)", 3),
    ("qa_qlora_nf4", "QLoRA NF4 + DQ, r=8, all-linear", 3),
    ("qa_qlora_fp4", "QLoRA FP4 + DQ, r=8, all-linear", 3),
    ("qa_full_bias", "Full fine-tuning (small-bias, BitFit's reference)", 3),
    ("qa_bitfit", "BitFit (all biases, small-bias)", 3),
]
# learning rates tried on the validation split, seed 0 (QLoRA uses its unquantized twin's lr, as the
# QLoRA paper does; it is swept only around that value)
SWEEP: Dict[str, List[float]] = {
    "qa_full": [1e-4, 2e-4, 3e-4, 5e-4, 1e-3],
    "qa_full_bias": [1e-4, 3e-4, 1e-3],
    "qa_freeze": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    "qa_lora_qv": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "qa_lora_all": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "qa_dora_qv": [1e-3, 3e-3, 1e-2, 2e-2],
    "qa_bitfit": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
}
# what may differ between the configs; everything else must be identical
PER_METHOD_KEYS = {"model", "method", "peft", "quantize", "lr", "output_dir", "seed"}


# --- configs ----------------------------------------------------------------------------------
def config_path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def load_cfg(name: str, overrides: Optional[List[str]] = None):
    from peftlab.train import load_train_config

    return load_train_config(str(config_path(name)), overrides or [])


def check_shared(names: List[str]) -> None:
    """Fail unless every config agrees on everything outside PER_METHOD_KEYS."""
    ref_name, ref = None, None
    for name in names:
        d = dataclasses.asdict(load_cfg(name))
        shared = {k: v for k, v in d.items() if k not in PER_METHOD_KEYS}
        if ref is None:
            ref_name, ref = name, shared
            continue
        diff = sorted(k for k in set(ref) | set(shared) if ref.get(k) != shared.get(k))
        if diff:
            sys.exit(f"{config_path(name)}: differs from {config_path(ref_name)} in shared field(s) {diff}; "
                     "the comparison needs the same data, steps and evaluation")


# --- runs -------------------------------------------------------------------------------------
def run_key(name: str, cfg) -> str:
    return f"{name}|split={cfg.data.eval_split}|steps={cfg.max_steps}|lr={cfg.lr:g}|seed={cfg.seed}"


def before_accuracy(cfg, cache: RunCache) -> float:
    """Exact-match accuracy of the (possibly quantized) base model, evaluated as the trainer does."""
    from peftlab.train.evaluate import evaluate_accuracy
    from peftlab.train.trainer import build_model, load_examples

    key = f"{cfg.model}|quantize={cfg.quantize}|split={cfg.data.eval_split}|n={cfg.data.max_eval_examples}"
    if key not in cache:
        model, tok = build_model(cfg, torch.device("cpu"))
        examples = load_examples(cfg, "eval")
        if cfg.data.max_eval_examples:
            examples = examples[: cfg.data.max_eval_examples]
        ev = evaluate_accuracy(model, tok, examples, cfg.data.template, cfg.eval_max_new_tokens,
                               cfg.eval_batch_size)
        cache.add({"key": key, "accuracy": ev["accuracy"], "n": ev["n"], "samples": ev["samples"]})
    return cache[key]["accuracy"]


def run_one(name: str, cfg, runs: RunCache, before_cache: RunCache) -> dict:
    """Train and evaluate one configuration (or return its recorded result)."""
    from peftlab.quant.report import quantization_report
    from peftlab.train import train

    key = run_key(name, cfg)
    if key in runs:
        return runs[key]
    before = before_accuracy(cfg, before_cache)
    print(f"[methods] {key} ...", flush=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    res = train(cfg, log=lambda *a: None)
    total = time.time() - t0
    model = res.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_params = model.config.num_parameters
    q = quantization_report(model) if cfg.quantize else {}
    rec = {"key": key, "config": name, "model": cfg.model, "method": cfg.method, "quantize": cfg.quantize,
           "peft": cfg.peft, "lr": cfg.lr, "seed": cfg.seed, "split": cfg.data.eval_split, "steps": cfg.max_steps,
           "before": before, "accuracy": res.eval["accuracy"], "n_eval": res.eval["n"], "eval_loss": res.eval["loss"],
           "final_train_loss": sum(res.losses[-10:]) / len(res.losses[-10:]),
           "trainable": trainable, "base_params": base_params, "share": trainable / base_params,
           "bits_per_weight": q.get("bits_per_weight"), "train_s": round(res.seconds, 1),
           "total_s": round(total, 1), "loadavg_1min": round(load, 2), **environment(),
           "samples": res.eval.get("samples", [])}
    runs.add(rec)
    print(f"[methods]   accuracy {before:.3f} -> {rec['accuracy']:.3f}, trainable {trainable:,} "
          f"({100 * rec['share']:.3f} %), {rec['train_s']} s train / {rec['total_s']} s total", flush=True)
    return rec


# --- aggregation ------------------------------------------------------------------------------
def mean_std(xs: List[float]):
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def pm(m: float, s: float, pct: bool = True) -> str:
    k = 100 if pct else 1
    return f"{k * m:.1f}" + ("" if math.isnan(s) else f" ± {k * s:.1f}")


def summarize(name: str, label: str, runs: List[dict]) -> dict:
    acc_m, acc_s = mean_std([r["accuracy"] for r in runs])
    gains = [r["accuracy"] - r["before"] for r in runs]
    g_m, g_s = mean_std(gains)
    r0 = runs[0]
    return {"config": name, "label": label, "model": r0["model"], "method": r0["method"],
            "quantize": r0["quantize"] or "", "lr": r0["lr"], "seeds": len(runs), "steps": r0["steps"],
            "before": statistics.fmean(r["before"] for r in runs), "after_mean": acc_m, "after_std": acc_s,
            "gain_mean": g_m, "gain_std": g_s, "accs": [r["accuracy"] for r in runs],
            "trainable": r0["trainable"], "share": r0["share"], "base_params": r0["base_params"],
            "bits_per_weight": r0["bits_per_weight"],
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "total_s": statistics.fmean(r["total_s"] for r in runs),
            "loadavg": statistics.fmean(r["loadavg_1min"] for r in runs)}


def acceptance(rows: Dict[str, dict]) -> List[str]:
    out = []
    full, lora = rows.get("qa_full"), rows.get("qa_lora_qv")
    if full and lora:
        frac = lora["gain_mean"] / full["gain_mean"] if full["gain_mean"] else float("nan")
        ok = frac >= 0.9 and lora["share"] < 0.01
        out.append(f"1. LoRA r=8 q,v vs full fine-tuning: gain {100 * lora['gain_mean']:.1f} vs "
                   f"{100 * full['gain_mean']:.1f} points = {100 * frac:.1f} % of full FT's gain (target >= 90 %), "
                   f"{lora['trainable']:,} trainable = {100 * lora['share']:.3f} % of {lora['base_params']:,} "
                   f"(target < 1 %): **{'PASS' if ok else 'FAIL'}**")
    ref, q = rows.get("qa_lora_all"), rows.get("qa_qlora_nf4")
    if ref and q:
        d = q["after_mean"] - ref["after_mean"]
        n_a, n_b = ref["seeds"], q["seeds"]
        if n_a > 1 and n_b > 1:
            margin = 2 * math.sqrt(ref["after_std"] ** 2 / n_a + q["after_std"] ** 2 / n_b)
            verdict = "PASS" if abs(d) <= margin else "FAIL"
            out.append(f"2. QLoRA NF4+DQ vs LoRA all-linear (fp32 base): {pm(q['after_mean'], q['after_std'])} vs "
                       f"{pm(ref['after_mean'], ref['after_std'])} %, Δ = {100 * d:+.1f} points, seed-noise margin "
                       f"(2 SE of the difference) ±{100 * margin:.1f}: **{verdict}**")
        fp4 = rows.get("qa_qlora_fp4")
        if fp4:
            out.append(f"   FP4 + DQ (recorded): {pm(fp4['after_mean'], fp4['after_std'])} %, "
                       f"Δ vs the fp32 reference {100 * (fp4['after_mean'] - ref['after_mean']):+.1f} points")
    return out


def write_table(summaries: List[dict], sweep_note: str) -> None:
    env = environment()
    cols = ["method", "base", "lr", "seeds", "before %", "after % (mean ± std)", "gain (points)",
            "gain / full FT", "trainable", "share %", "train s/run", "total s/run"]
    rows = {s["config"]: s for s in summaries}
    lines = [f"# Methods table: synthetic QA, held-out people (test split, {summaries[0]['steps']} steps)", "",
             f"Date {env['date']}; CPU {env['cpu']}; torch {env['torch']}, {env['threads']} threads. "
             "Produced by `python experiments/methods_table.py` from experiments/configs/qa_*.yaml.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    csv_rows = []
    for s in summaries:
        ref = rows.get("qa_full_bias" if s["model"] == "small-bias" else "qa_full")
        rel = s["gain_mean"] / ref["gain_mean"] if ref and ref["gain_mean"] else float("nan")
        base = s["model"] + (f" ({s['quantize']}, {s['bits_per_weight']:.3f} bits/w)" if s["quantize"] else "")
        lines.append("| " + " | ".join([
            s["label"], base, f"{s['lr']:g}", str(s["seeds"]), f"{100 * s['before']:.1f}",
            pm(s["after_mean"], s["after_std"]), pm(s["gain_mean"], s["gain_std"]), f"{100 * rel:.0f} %",
            f"{s['trainable']:,}", f"{100 * s['share']:.3f}", f"{s['train_s']:.0f}", f"{s['total_s']:.0f}"]) + " |")
        csv_rows.append({k: v for k, v in s.items() if k != "accs"} | {
            "accs": " ".join(f"{a:.4f}" for a in s["accs"]), "gain_vs_full": rel, **env})
    lines += ["", "Gain / full FT: relative to full fine-tuning on the same base (small, or small-bias "
              "for BitFit and its full-FT row). Share: of the base model's parameters. "
              "Mean ± sample std over seeds (seed = adapter init and data order). Wall time per run "
              "includes model loading and the final test evaluation (total) or not (train); the mean "
              f"1-minute load average during the runs was {statistics.fmean(s['loadavg'] for s in summaries):.1f} "
              f"on {os.cpu_count()} cores, so times are upper bounds when the machine was shared.", "",
              "## Acceptance", ""] + acceptance(rows) + ["", sweep_note]
    RESULTS.mkdir(parents=True, exist_ok=True)
    from peftlab.fileio import atomic_write

    with atomic_write(RESULTS / "methods_table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
    w.writeheader()
    w.writerows(csv_rows)
    with atomic_write(RESULTS / "methods_table.csv", "w") as f:
        f.write(buf.getvalue())
    print("\n".join(lines))


def sweep_summary(records: List[dict]) -> str:
    """Markdown of the lr sweep and the best lr per config (validation accuracy)."""
    by: Dict[str, List[dict]] = {}
    for r in records:
        by.setdefault(r["config"], []).append(r)
    lines = ["| config | " + " | ".join(["lr → validation accuracy %"]) + " | best lr | config lr |", "|---|---|---|---|"]
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["lr"])
        best = max(rs, key=lambda r: r["accuracy"])
        lines.append(f"| {name} | " + ", ".join(f"{r['lr']:g} → {100 * r['accuracy']:.1f}" for r in rs)
                     + f" | {best['lr']:g} | {load_cfg(name).lr:g} |")
    return "\n".join(lines)


def write_sweep(recs: List[dict]) -> None:
    from peftlab.fileio import atomic_write

    md = sweep_summary(recs)
    env = environment()
    with atomic_write(RESULTS / "methods_lr_sweep.md", "w") as f:
        f.write(f"# Learning-rate sweep for the methods table (validation split, seed 0, {recs[0]['steps']} steps)"
                f"\n\nDate {env['date']}; CPU {env['cpu']}; torch {env['torch']}, {env['threads']} threads.\n\n{md}\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["config", "lr", "accuracy", "eval_loss", "final_train_loss", "train_s"])
    for r in recs:
        w.writerow([r["config"], r["lr"], r["accuracy"], r["eval_loss"], r["final_train_loss"], r["train_s"]])
    with atomic_write(RESULTS / "methods_lr_sweep.csv", "w") as f:
        f.write(buf.getvalue())
    print(md)


# --- main -------------------------------------------------------------------------------------
def main(argv=None) -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="lr grid on the validation split (seed 0)")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from recorded runs")
    ap.add_argument("--steps", type=int, help="override max_steps (smoke runs; use with --results)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where records and tables go")
    ap.add_argument("--max-eval", type=int, help="override data.max_eval_examples (smoke runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1, see the module docstring)")
    args = ap.parse_args(argv)
    RESULTS = args.results
    extra = ([f"max_steps={args.steps}"] if args.steps else []) + \
        ([f"data.max_eval_examples={args.max_eval}"] if args.max_eval else [])
    torch.set_num_threads(args.threads)
    names = [n for n, _, _ in TABLE]
    check_shared(names)
    wanted = set(args.only or names)
    unknown = wanted - set(names)
    if unknown:
        sys.exit(f"unknown config(s) {sorted(unknown)}; known: {', '.join(names)}")
    before_cache = RunCache(RESULTS / "methods_table_before.jsonl")

    def runs_of(cache: RunCache, name: str, overrides_list: List[List[str]]) -> List[dict]:
        """Recorded results of `name` under each override list, running the missing ones if wanted."""
        out = []
        for overrides in overrides_list:
            cfg = load_cfg(name, overrides + extra)
            key = run_key(name, cfg)
            if key in cache:
                out.append(cache[key])
            elif name in wanted and not args.report_only:
                out.append(run_one(name, cfg, cache, before_cache))
        return out

    if args.sweep:
        cache = RunCache(RESULTS / "methods_lr_sweep_runs.jsonl")
        recs = []
        for name in names:
            recs += runs_of(cache, name, [[f"lr={lr}", "data.eval_split=validation", "seed=0",
                                           f"output_dir=runs/methods_sweep/{name}_lr{lr:g}"]
                                          for lr in SWEEP.get(name, [])])
        if recs:
            write_sweep(recs)
        return

    cache = RunCache(RESULTS / "methods_table_runs.jsonl")
    summaries = []
    for name, label, seeds in TABLE:
        runs = runs_of(cache, name, [[f"seed={seed}", f"output_dir=runs/methods_table/{name}_s{seed}"]
                                     for seed in range(seeds)])
        if runs:
            summaries.append(summarize(name, label, runs))
    sweep_md = RESULTS / "methods_lr_sweep.md"
    note = ("Learning rates: chosen on the validation split, see methods_lr_sweep.md:\n\n"
            + sweep_md.read_text(encoding="utf-8").split("\n\n", 2)[-1]) if sweep_md.is_file() else ""
    if summaries:
        write_table(summaries, note)


if __name__ == "__main__":
    main()
