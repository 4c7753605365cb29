"""`peftlab pretrain`: a base model from scratch on the synthetic world, and what it knows.

The corpus is the world's pretraining documents (every fact in many paraphrases; see
data/synthworld.py); every 50th document is held out for validation perplexity. After training,
the exported checkpoint is reloaded exactly as stored and probed with cloze prompts built from
templates the corpus never used ("X first saw the light of day in" -> "Vendrath"): the share it
completes correctly is knowledge that fine-tuning can later make answerable in other formats.
Results (curve, perplexity, probe accuracy per relation) go to experiments/results/.
"""
from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..data.formats import Example
from ..data.match import exact_match
from ..errors import ConfigError
from ..fileio import atomic_write

VALIDATION_EVERY = 50


def pretrain_corpus(seed: int = 0, split: str = "train") -> List[Example]:
    """The world's documents as plain-text examples; every 50th goes to 'validation'."""
    from ..data.synthworld import get_world

    docs = get_world(seed).pretrain_texts()
    if split == "train":
        keep = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY]
    elif split in ("validation", "test"):
        keep = docs[::VALIDATION_EVERY]
    else:
        raise ConfigError(f"unknown split {split!r} for the pretraining corpus (train, validation, test)")
    return [Example(text=d) for d in keep]


@torch.no_grad()
def cloze_accuracy(model, tokenizer, probes: List[Dict], batch_size: int = 64, max_new_tokens: int = 8) -> Dict:
    """Greedy continuation of each probe prompt, cut at the first '.', scored by exact match."""
    from ..models.generation import generate, left_pad

    device = next(model.parameters()).device
    model.eval()
    per_rel = defaultdict(list)
    for i in range(0, len(probes), batch_size):
        chunk = probes[i:i + batch_size]
        ids, mask = left_pad([tokenizer.encode(p["prompt"], bos=True) for p in chunk], tokenizer.pad_id)
        out = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for p, row in zip(chunk, out.tolist()):
            text = tokenizer.decode([t for t in row if t != tokenizer.pad_id]).split(".")[0]
            per_rel[p["relation"]].append(exact_match(text, p["answer"]))
    allhits = [h for v in per_rel.values() for h in v]
    return {"accuracy": sum(allhits) / max(len(allhits), 1), "n": len(allhits),
            "per_relation": {r: round(sum(v) / len(v), 4) for r, v in sorted(per_rel.items())}}


def plot_curve(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, vsteps, vlosses = [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            steps.append(r["step"]), losses.append(r["loss"])
        if "eval_loss" in r:
            vsteps.append(r["step"]), vlosses.append(r["eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss")
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.set_yscale("log")
    ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def pretrain(config_path: str, overrides: Optional[List[str]] = None, results_dir: str = "experiments/results") -> Dict:
    from ..data.synthworld import get_world, train_tokenizer
    from ..models import load_pretrained
    from .config import load_train_config
    from .evaluate import evaluate_loss
    from .export import export_final
    from .trainer import train

    cfg = load_train_config(config_path, overrides)
    if cfg.tokenizer and not Path(cfg.tokenizer).is_file():
        print(f"[pretrain] training the tokenizer -> {cfg.tokenizer}")
        train_tokenizer(cfg.tokenizer, vocab_size=int((cfg.model_config or {}).get("vocab_size", 2048)), seed=cfg.data.world_seed)
    t0 = time.time()
    res = train(cfg)
    out = export_final(res, cfg)
    device = next(res.model.parameters()).device
    model, tok = load_pretrained(out, dtype=torch.float32, device=device)
    world = get_world(cfg.data.world_seed)
    val = evaluate_loss(model, tok, pretrain_corpus(cfg.data.world_seed, "validation"), max_length=cfg.data.max_length)
    held = cloze_accuracy(model, tok, world.cloze_probes(held_out=True))
    seen = cloze_accuracy(model, tok, world.cloze_probes(held_out=False)[::4])  # a quarter of 12,600
    name = Path(out).name
    summary = {
        "checkpoint": str(out), "config": str(config_path), "overrides": overrides or [],
        "parameters": sum(p.numel() for p in model.parameters()), "steps": len(res.losses),
        "final_train_loss": res.losses[-1], "validation_loss": val["loss"], "validation_ppl": val["ppl"],
        "cloze_heldout_templates": held, "cloze_pretraining_templates": seen,
        "seconds": round(time.time() - t0, 1), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": date.today().isoformat(),
    }
    rdir = Path(results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(rdir / f"pretrain_{name}.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    plot_curve(res.run_dir / "metrics.jsonl", rdir / f"pretrain_{name}.png", f"pretraining {name}")
    print(f"[pretrain] {name}: {summary['parameters']:,} params, validation ppl {val['ppl']:.3f}, "
          f"held-out cloze accuracy {held['accuracy']:.3f}, pretraining-template cloze {seen['accuracy']:.3f}")
    return summary
