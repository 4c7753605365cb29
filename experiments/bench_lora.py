"""CPU benchmark: one LoRA training step in peftlab vs transformers + Hugging Face PEFT.

Both sides get the same Llama config and the same weights (one random checkpoint written by
transformers and loaded by both), LoRA r=8, alpha=16, no dropout, on every linear layer of the
decoder (q, k, v, o, gate, up, down), float32. Each side runs its own natural training step on
the same batch ids [batch, seq], with the mean next-token cross-entropy over the batch * (seq - 1)
predicted positions as the loss:

    peftlab:            s, n = causal_lm_loss_sum(model, ids, ids);  loss = s / n
                        (peftlab.train.linear_ce: final hidden states, then output head and
                        cross-entropy fused in row chunks; the trainer's loss)
    transformers+PEFT:  loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                        (transformers' own causal-LM loss: full logits, then cross-entropy)
    both:               loss.backward();  AdamW.step();  zero_grad()
                        torch.optim.AdamW (foreach=False), adapters only

Before timing, the two models must agree on the logits (max relative error <= 1e-4) and on the
loss of the batch (relative 1e-5), so both steps compute the same thing.

Timing alternates the two (A B, then B A, ...) so that load on a shared machine hits both alike;
the ratio is the median over pairs of t_HF / t_peftlab. tokens/s = batch * seq / median step time.

Merged inference: `merge_and_unload` of the peftlab LoRA model against the plain base model, both
forward-only under inference_mode (eval mode, same batch), interleaved the same way; the merged
model should cost the same as the base (ratio ~ 1.00). The unmerged LoRA forward is timed too.

    python experiments/bench_lora.py                   # defaults below, ~3-8 min on 2 cores
    python experiments/bench_lora.py --threads 2 1     # also one thread (a shared machine)
    python experiments/bench_lora.py --profile         # also torch.profiler tables (3 steps each, 1 thread)

Prints a table (CPU, torch / transformers / peft versions, date) and writes bench_lora.csv and
bench_lora.md (and bench_lora_profile.txt with --profile) under --out.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runlog import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peftlab_loss(model) -> Callable:
    from peftlab.train.linear_ce import causal_lm_loss_sum

    def loss(ids):
        s, n = causal_lm_loss_sum(model, ids, ids)
        return s / n
    return loss


def hf_loss(model) -> Callable:
    return lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss


def build_models(args, tmp: Path):
    """(peftlab LoRA model, HF PEFT LoRA model, peftlab base model) with identical weights."""
    import peft
    import transformers

    import peftlab
    from peftlab.tuners.lora_config import LoraConfig

    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq), rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    hf.save_pretrained(tmp)
    ours, _ = peftlab.load_pretrained(tmp, dtype=torch.float32)
    base, _ = peftlab.load_pretrained(tmp, dtype=torch.float32)
    ours = peftlab.get_peft_model(ours, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                   target_modules="all-linear"))
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    # same adapter values on both sides, B non-zero so that the adapters change the output
    hf_params = dict(hf.named_parameters())
    g = torch.Generator().manual_seed(1)
    n_copied = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            hf_params[f"base_model.model.{name}"].copy_(p)
            n_copied += 1
    n_hf = sum(1 for p in hf.parameters() if p.requires_grad)
    if n_copied != n_hf:
        raise SystemExit(f"trainable tensors differ: peftlab {n_copied}, HF PEFT {n_hf}")
    return ours, hf, base


def check_same(ours, hf, ids) -> float:
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids, use_cache=False).logits
    err = float((a - b).abs().max() / b.abs().max())
    if err > 1e-4:
        raise SystemExit(f"peftlab and HF PEFT logits differ: max relative error {err:.2e}")
    return err


def check_same_loss(ours, hf, ids) -> float:
    with torch.no_grad():
        a = float(peftlab_loss(ours)(ids))
        b = float(hf_loss(hf)(ids))
    err = abs(a - b) / abs(b)
    if err > 1e-5:
        raise SystemExit(f"peftlab and HF PEFT losses differ: {a} vs {b} (relative {err:.2e})")
    return err


def train_step_fn(model, loss_fn: Callable, lr: float = 1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, foreach=False)

    def step(ids):
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def interleaved(fns: Dict[str, Callable], ids, pairs: int, warmup: int) -> Dict[str, List[float]]:
    """Per-call wall times of each function, alternating the order every round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n](ids)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(pairs):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            fns[n](ids)
            times[n].append(time.perf_counter() - t)
    return times


def median_ratio(num: List[float], den: List[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def profile_step(fn, ids, label: str, rows: int = 25, steps: int = 3) -> str:
    """torch.profiler tables (self CPU time by op, and by op and input shapes) over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    fn(ids)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fn(ids)
    label = f"{label} ({steps} steps, {torch.get_num_threads()} thread(s))"
    return (f"== {label}: by op ==\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            + f"\n== {label}: by op and input shapes ==\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=2 * rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="torch thread counts to measure in turn (the first is the headline)")
    ap.add_argument("--pairs", type=int, default=20, help="timed A/B rounds of training steps")
    ap.add_argument("--infer-pairs", type=int, default=30, help="timed rounds of forward passes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-threads", type=int, default=1,
                    help="threads while profiling (1: with 2 threads on a shared VM every op waits for "
                         "the other thread and the tables show scheduling, not work)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args(argv)

    import peft
    import transformers

    import peftlab

    env = {"date": datetime.date.today().isoformat(), "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "loadavg_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, base = build_models(args, Path(tmp))
    ids = torch.randint(4, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    err = check_same(ours.eval(), hf.eval(), ids)
    loss_err = check_same_loss(ours, hf, ids)
    ours.train()
    hf.train()
    tokens = args.batch * args.seq
    fns = {"peftlab": train_step_fn(ours, peftlab_loss(ours)), "hf_peft": train_step_fn(hf, hf_loss(hf))}
    lora_eval = copy.deepcopy(ours).eval()
    merged = peftlab.merge_and_unload(copy.deepcopy(ours)).eval()
    base.eval()
    with torch.no_grad():
        merge_err = float((merged(ids) - lora_eval(ids)).abs().max() / lora_eval(ids).abs().max())
    n_lora_layers = sum(1 for m in merged.modules() if hasattr(m, "lora_A"))
    if n_lora_layers:
        raise SystemExit(f"merge_and_unload left {n_lora_layers} LoRA layers")

    def fwd(model):
        def f(x):
            with torch.inference_mode():
                return model(x)
        return f

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        t_train = interleaved(fns, ids, args.pairs, args.warmup)
        t_inf = interleaved({"base": fwd(base), "merged": fwd(merged), "lora_unmerged": fwd(lora_eval)},
                            ids, args.infer_pairs, args.warmup)
        med = {k: statistics.median(v) for k, v in {**t_train, **t_inf}.items()}
        step = "train step (fwd+bwd+AdamW)"
        rows += [
            dict(threads=threads, case=step, impl="peftlab", median_ms=1e3 * med["peftlab"],
                 tokens_per_s=tokens / med["peftlab"], ratio="", note=""),
            dict(threads=threads, case=step, impl="transformers+peft", median_ms=1e3 * med["hf_peft"],
                 tokens_per_s=tokens / med["hf_peft"], ratio="", note=""),
            dict(threads=threads, case="train step speedup", impl="HF time / peftlab time", median_ms="",
                 tokens_per_s="", ratio=median_ratio(t_train["hf_peft"], t_train["peftlab"]), note="target >= 1.30"),
            dict(threads=threads, case="inference forward", impl="peftlab base", median_ms=1e3 * med["base"],
                 tokens_per_s=tokens / med["base"], ratio="", note=""),
            dict(threads=threads, case="inference forward", impl="peftlab merge_and_unload",
                 median_ms=1e3 * med["merged"], tokens_per_s=tokens / med["merged"],
                 ratio=median_ratio(t_inf["merged"], t_inf["base"]), note="merged / base, target ~1.00"),
            dict(threads=threads, case="inference forward", impl="peftlab LoRA unmerged",
                 median_ms=1e3 * med["lora_unmerged"], tokens_per_s=tokens / med["lora_unmerged"],
                 ratio=median_ratio(t_inf["lora_unmerged"], t_inf["base"]), note="unmerged / base"),
        ]
    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads[0])

    shape = (f"Llama hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
             f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; LoRA r={args.r} "
             "all-linear, fp32")
    header = (f"CPU {env['cpu']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
              f"{env['date']}; 1-min load average {env['loadavg_start']} -> {env['loadavg_end']}")
    cols = ["threads", "case", "impl", "median_ms", "tokens_per_s", "ratio", "note"]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    md = ["# LoRA training step on the CPU: peftlab vs transformers + PEFT", "", shape, "", header, "",
          "Each side's own training step: peftlab `causal_lm_loss_sum` (fused head + cross-entropy), "
          "transformers+PEFT `model(input_ids, labels=...).loss`. "
          f"Logits agree before timing (max relative error {err:.1e}), and so do the losses "
          f"(relative {loss_err:.1e}); merged vs unmerged "
          f"{merge_err:.1e}. {args.pairs} interleaved training rounds, {args.infer_pairs} inference "
          "rounds per thread count; ratios are medians of per-round ratios.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    print("\n".join(md))
    args.out.mkdir(parents=True, exist_ok=True)
    from peftlab.fileio import atomic_write

    with atomic_write(args.out / "bench_lora.md", "w") as f:
        f.write("\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + list(env) + ["shape"])
    w.writeheader()
    for r in rows:
        w.writerow({**{c: fmt(r[c]) for c in cols}, **env, "shape": shape})
    with atomic_write(args.out / "bench_lora.csv", "w") as f:
        f.write(buf.getvalue())

    if args.profile:
        torch.set_num_threads(args.profile_threads)
        text = "\n\n".join([profile_step(fns["peftlab"], ids, "peftlab train step"),
                            profile_step(fns["hf_peft"], ids, "transformers + peft train step")])
        print(text)
        with atomic_write(args.out / "bench_lora_profile.txt", "w") as f:
            f.write(f"{header}\n{shape}\n\n{text}\n")


if __name__ == "__main__":
    main()
