"""Prompt tuning, P-tuning and prefix tuning side by side on one task, with LoRA for reference.

Methods (configs in experiments/configs/prompt_methods/, each runnable alone with `peftlab train`):

  prompt tuning   Lester et al. 2021 (arXiv 2104.08691, §2-3): 20 virtual input tokens,
                  initialised RANDOM (U(-0.5, 0.5)), VOCAB (embeddings of frequent tokens) or
                  TEXT (the embeddings of a task description)
  P-tuning        Liu et al. 2021 (arXiv 2103.10385, §3): the 20 tokens are the output of a
                  prompt encoder, MLP(E) or MLP(BiLSTM(E)); the Hugging Face layout (a prefix)
  prefix tuning   Li & Liang 2021 (arXiv 2101.00190, §4): 20 key/value vectors in every layer,
                  reparameterised by an MLP (hidden 512) while training; with
                  prefix_projection=False the table itself is trained (deep prompt tuning,
                  P-tuning v2, Liu et al. 2021, arXiv 2110.07602)
  LoRA r=8        q_proj, v_proj, alpha 16 (reference)

Task: the synthetic world's `qa` task ("Where was Ru Dakthorn born?" -> "Vendrath"), default chat
template. Why QA: the frozen base knows the facts only as statements in its pretraining corpus and
has never seen a question or the chat format, so a method must *learn* the mapping from a question
to the stored fact; the test split asks about 60 people the training set never mentions (the
knowledge must come from the frozen base, not from fine-tuning data), and half of its questions use
phrasings that training never shows (generalisation over the prompt). It has all six relations
(1,080 training, 720 test questions), multi-token answers scored by exact match of greedy
generation, and it is the format real users of these methods fine-tune for. `cloze` would need no
format learning (the base already completes statements: experiments/ptuning_cloze.py covers it),
and `classify` (nationality only, 5 labels, 120 test questions) is too narrow to rank methods.

Protocol: every method trains max_steps (300 for the table) at batch 16 with AdamW, cosine schedule,
20 warm-up steps, clipping 1.0. The learning rate is chosen per method on VALIDATION people
(`--stage sweep`: 150-step runs, the first 180 validation questions); while the best lr is at an
edge of the grid, the grid is extended by a factor 3 in that direction (at most twice). The table then trains
each method with its chosen lr and scores the full test split (720 questions): all, seen question
templates (360) and held-out question templates (360), and per relation.

    python experiments/prompt_methods_table.py --stage sweep              # lr selection, ~15 min
    python experiments/prompt_methods_table.py --stage table --seeds 0 1  # ~20 min
    python experiments/prompt_methods_table.py --stage table --seeds 2    # ~10 min; tables cover all seeds run
    python experiments/prompt_methods_table.py --report-only              # rewrite the tables from the cache

Times: this 2-core CPU, shared with another job, one torch thread (faster than two on a shared
2-core machine); the tables' wall times are training only. Both stages are resumable (finished
runs are cached in runs/prompt_methods/records.jsonl). Results:
experiments/results/prompt_methods_table.{md,csv}.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftlab.data.collate import reference_answer  # noqa: E402
from peftlab.data.match import exact_match  # noqa: E402
from runlog import RunCache, environment  # noqa: E402
from peftlab.train import load_train_config, train  # noqa: E402
from peftlab.train.evaluate import generate_answers  # noqa: E402
from peftlab.train.trainer import build_model, load_examples  # noqa: E402

CONFIGS = ROOT / "experiments" / "configs" / "prompt_methods"
RUNS = ROOT / "runs" / "prompt_methods"
CACHE = RUNS / "records.jsonl"
RESULTS = ROOT / "experiments" / "results"
SWEEP_STEPS = 150
SWEEP_EVAL = 180
TABLE_STEPS = 300

# name, label, lr grid (validation sweep)
METHODS = [
    ("prompt_tuning_random", "prompt tuning, random init", (3e-2, 1e-1, 3e-1)),
    ("prompt_tuning_vocab", "prompt tuning, vocab init", (3e-2, 1e-1, 3e-1)),
    ("prompt_tuning_text", "prompt tuning, text init", (3e-2, 1e-1, 3e-1)),
    ("p_tuning_mlp", "P-tuning, MLP encoder", (1e-3, 3e-3, 1e-2)),
    ("p_tuning_lstm", "P-tuning, LSTM encoder", (1e-3, 3e-3, 1e-2)),
    ("prefix_tuning", "prefix tuning (projection)", (3e-4, 1e-3, 3e-3)),
    ("deep_prompt_tuning", "prefix tuning, no projection (deep prompt tuning)", (3e-3, 1e-2, 3e-2)),
    ("lora_r8", "LoRA r=8 q,v (reference)", (1e-3, 3e-3)),
]


def config(name: str, overrides: List[str]):
    return load_train_config(CONFIGS / f"{name}.yaml", ["progress=false", "resume=false", "save_every=0"] + overrides)


def count_params(model, method: str) -> Dict[str, int]:
    """Trainable numbers while training, and what must be stored/added at inference: the folded
    prompt for virtual-token methods, the LoRA factors (0 extra once merged) otherwise."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inference = model.folded_prompt().numel() if hasattr(model, "folded_prompt") else trainable
    return {"trainable_params": trainable, "inference_params": inference}


# --- stages -------------------------------------------------------------------------------------
def sweep_one(cache, name: str, lr: float) -> dict:
    key = f"sweep/{name}/{lr:g}"
    if key not in cache:
        cfg = config(name, [f"lr={lr}", f"max_steps={SWEEP_STEPS}", "data.eval_split=validation",
                            f"data.max_eval_examples={SWEEP_EVAL}", f"output_dir={RUNS}/sweep/{name}_lr{lr:g}"])
        res = train(cfg, log=lambda *_: None)
        cache.add({"key": key, "stage": "sweep", "method": name, "lr": lr, "steps": SWEEP_STEPS,
                   "val_accuracy": res.eval["accuracy"], "val_loss": res.eval["loss"], "n": res.eval["n"],
                   "final_train_loss": res.losses[-1], "train_seconds": round(res.seconds, 1)})
        print(f"[sweep] {name:22s} lr {lr:<7g} val acc {res.eval['accuracy']:.3f} loss {res.eval['loss']:.3f} "
              f"({res.seconds:.0f}s)", flush=True)
    return cache[key]


def sweep_grid(cache, name: str, grid, max_extensions: int = 2) -> List[float]:
    """The grid, extended by a factor 3 past an edge that wins (at most `max_extensions` times)."""
    lrs = sorted(grid)
    accs = {lr: sweep_one(cache, name, lr)["val_accuracy"] for lr in lrs}
    for _ in range(max_extensions):
        best = max(lrs, key=lambda lr: (accs[lr], -lr))
        if best not in (lrs[0], lrs[-1]):
            break
        extra = best / 3 if best == lrs[0] else best * 3
        accs[extra] = sweep_one(cache, name, extra)["val_accuracy"]
        lrs = sorted(accs)
    return lrs


def chosen_lr(cache, name: str) -> float:
    runs = [r for r in cache.values() if r.get("stage") == "sweep" and r["method"] == name]
    if not runs:
        raise SystemExit(f"{name}: no sweep runs in {CACHE}; run --stage sweep first")
    return max(runs, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]


def test_scores(model, tok, cfg) -> dict:
    """Exact match of greedy answers on the whole eval split: all, by template kind, by relation."""
    t0 = time.time()
    examples = load_examples(cfg, "eval")
    preds = generate_answers(model, tok, examples, cfg.data.template, cfg.eval_max_new_tokens, cfg.eval_batch_size)
    hits = [exact_match(p, reference_answer(ex)) for p, ex in zip(preds, examples)]

    def acc(keep) -> float:
        sel = [h for h, ex in zip(hits, examples) if keep(ex)]
        return sum(sel) / len(sel)

    rels = sorted({ex.meta["relation"] for ex in examples})
    return {"test_accuracy": acc(lambda ex: True), "test_seen_templates": acc(lambda ex: not ex.meta["held_out"]),
            "test_heldout_templates": acc(lambda ex: ex.meta["held_out"]), "n": len(hits),
            "per_relation": {r: acc(lambda ex, r=r: ex.meta["relation"] == r) for r in rels},
            "eval_seconds": round(time.time() - t0, 1),
            "samples": [{"q": ex.messages[0].content, "pred": p, "ref": reference_answer(ex)}
                        for ex, p in list(zip(examples, preds))[:4]]}


def _show(rec: dict) -> None:
    print(f"[table] {rec['method']:22s} lr {rec['lr']:<7g} seed {rec['seed']} test acc {rec['test_accuracy']:.3f} "
          f"(seen {rec['test_seen_templates']:.3f}, held-out {rec['test_heldout_templates']:.3f}) "
          f"train {rec['train_seconds']:.0f}s", flush=True)


def table_one(cache, name: str, lr: float, seed: int) -> dict:
    key = f"table/{name}/{lr:g}/{TABLE_STEPS}/{seed}"
    if key not in cache:
        cfg = config(name, [f"lr={lr}", f"max_steps={TABLE_STEPS}", "eval_generate=false", f"seed={seed}",
                            f"output_dir={RUNS}/table/{name}_seed{seed}"])
        res = train(cfg, log=lambda *_: None)
        _show(cache.add({"key": key, "stage": "table", "method": name, "lr": lr, "steps": TABLE_STEPS, "seed": seed,
                         "batch_size": cfg.batch_size, **count_params(res.model, cfg.method),
                         **test_scores(res.model, res.tokenizer, cfg), "test_loss": res.eval["loss"],
                         "final_train_loss": res.losses[-1], "train_seconds": round(res.seconds, 1)}))
    return cache[key]


def frozen_base(cache) -> dict:
    """The untrained base on the same test questions: what every method starts from."""
    key = "table/frozen_base"
    if key not in cache:
        cfg = config("lora_r8", ["eval_generate=false"])  # only its (shared) data and eval settings are used
        model, tok = build_model(cfg, torch.device("cpu"))
        _show(cache.add({"key": key, "stage": "table", "method": "frozen_base", "lr": 0.0, "steps": 0, "seed": 0,
                         "batch_size": cfg.batch_size, "trainable_params": 0, "inference_params": 0,
                         **test_scores(model, tok, cfg), "test_loss": None, "final_train_loss": None,
                         "train_seconds": 0.0}))
    return cache[key]


# --- report -------------------------------------------------------------------------------------
def _mean(runs: List[dict], key: str, sub: str = None) -> float:
    return statistics.mean((r[key][sub] if sub else r[key]) for r in runs)


def _pm(runs: List[dict], key: str) -> str:
    """mean ± sample std over seeds, in %."""
    xs = [100 * r[key] for r in runs]
    return f"{statistics.mean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def report(cache) -> None:
    env = environment()
    rows = []  # (name, label, runs at the chosen lr (one per seed), sweep records)
    if "table/frozen_base" in cache:
        rows.append(("frozen_base", "frozen base, no training", [cache["table/frozen_base"]], []))
    for name, label, _ in METHODS:
        sweep = sorted([r for r in cache.values() if r.get("stage") == "sweep" and r["method"] == name],
                       key=lambda r: r["lr"])
        if not sweep:
            continue
        lr = chosen_lr(cache, name)
        runs = sorted([r for r in cache.values() if r.get("stage") == "table" and r["method"] == name
                       and r["lr"] == lr and r["steps"] == TABLE_STEPS], key=lambda r: r["seed"])
        if runs:
            rows.append((name, label, runs, sweep))
    RESULTS.mkdir(parents=True, exist_ok=True)
    rels = sorted(rows[0][2][0]["per_relation"]) if rows else []
    with open(RESULTS / "prompt_methods_table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "seed", "lr", "steps", "batch_size", "trainable_params", "inference_params",
                    "test_accuracy", "test_seen_templates", "test_heldout_templates"] + [f"test_{x}" for x in rels] +
                   ["test_loss", "train_seconds", "seconds_per_step", "lrs_tried", "val_accuracy_per_lr",
                    "date", "cpu", "torch", "threads"])
        for name, label, runs, sweep in rows:
            for r in runs:
                w.writerow([name, label, r["seed"], r["lr"], r["steps"], r["batch_size"], r["trainable_params"],
                            r["inference_params"], round(r["test_accuracy"], 4), round(r["test_seen_templates"], 4),
                            round(r["test_heldout_templates"], 4)] + [round(r["per_relation"][x], 4) for x in rels] +
                           [None if r["test_loss"] is None else round(r["test_loss"], 4), r["train_seconds"],
                            round(r["train_seconds"] / r["steps"], 3) if r["steps"] else 0,
                            " ".join(f"{s['lr']:g}" for s in sweep), " ".join(f"{s['val_accuracy']:.4f}" for s in sweep),
                            env["date"], env["cpu"], env["torch"], env["threads"]])
    seeds = sorted({r["seed"] for name, _, runs, _ in rows if name != "frozen_base" for r in runs})
    L = ["# Prompt methods on the QA task (base-small, frozen)", "",
         f"Generated by `experiments/prompt_methods_table.py` on {env['date']}; CPU: {env['cpu']}, "
         f"{env['threads']} torch thread (a 2-core machine shared with other jobs: times are indicative); "
         f"torch {env['torch']}.", "",
         f"Task `qa`, default chat template; {TABLE_STEPS} steps x batch 16 (4.4 epochs of the 1,080 training "
         "questions), AdamW, cosine, 20 warm-up steps, clip 1.0. Test = 720 questions about 60 people that "
         "training never mentions (360 with training's question templates, 360 with held-out phrasings); exact "
         "match of greedy answers (binomial SE about 1.9 points at 50% on 720). lr chosen per method on validation "
         f"people ({SWEEP_STEPS}-step runs, seed 0, {SWEEP_EVAL} validation questions). Accuracy = mean ± sample "
         f"std over seeds {seeds} (seed = prompt initialisation and batch order); 'seeds' lists each run. Params "
         "at inference: the folded prompt for the virtual-token methods (P-tuning's encoder and prefix tuning's MLP "
         "are dropped after training); LoRA's factors (0 extra once merged into the weights). Train s = mean "
         "training time per run (no evaluation).", "",
         "| method | lr | trainable params (training) | params at inference | test acc % | seeds | seen templates % | "
         "held-out templates % | train s | s/step |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, label, runs, _ in rows:
        r0 = runs[0]
        secs = _mean(runs, "train_seconds")
        lr_txt = f"{r0['lr']:g}" if r0["steps"] else "-"
        L.append(f"| {label} | {lr_txt} | {r0['trainable_params']:,} | {r0['inference_params']:,} | "
                 f"{_pm(runs, 'test_accuracy')} | {', '.join(f'{100 * x:.1f}' for x in (r['test_accuracy'] for r in runs))} | "
                 f"{_pm(runs, 'test_seen_templates')} | {_pm(runs, 'test_heldout_templates')} | "
                 f"{secs:.0f} | {secs / r0['steps'] if r0['steps'] else 0:.2f} |")
    L += ["", "Per relation (test accuracy %, 120 questions each, mean over seeds):", "",
          "| method | " + " | ".join(rels) + " |", "|---|" + "---:|" * len(rels)]
    for name, label, runs, _ in rows:
        L.append(f"| {label} | " + " | ".join(f"{100 * _mean(runs, 'per_relation', x):.1f}" for x in rels) + " |")
    L += ["", f"Learning-rate sweep (validation accuracy %, {SWEEP_STEPS} steps, seed 0; * = chosen):", "",
          "| method | lr: accuracy |", "|---|---|"]
    for name, label, runs, sweep in rows:
        if sweep:
            L.append(f"| {label} | " + ", ".join(
                f"{s['lr']:g}: {100 * s['val_accuracy']:.1f}{'*' if s['lr'] == runs[0]['lr'] else ''}" for s in sweep) + " |")
    (RESULTS / "prompt_methods_table.md").write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=("sweep", "table", "all"), default="all")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--methods", nargs="*", help="subset of method names (default: all)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="table seeds (the table reports their mean)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = RunCache(CACHE)
    todo = [m for m in METHODS if not args.methods or m[0] in args.methods]
    t0 = time.time()
    if not args.report_only:
        if args.stage in ("sweep", "all"):
            for name, _, grid in todo:
                sweep_grid(cache, name, grid)
        if args.stage in ("table", "all"):
            frozen_base(cache)
            for seed in args.seeds:
                for name, _, _ in todo:
                    table_one(cache, name, chosen_lr(cache, name), seed)
    report(cache)
    print(f"[done] {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
