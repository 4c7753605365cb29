"""P-tuning vs hand-written cloze templates on the frozen base (LAMA-style knowledge probing).

Claim under test (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385, §4.1, Table 1):
continuous prompts learned by P-tuning on a FROZEN language model retrieve more facts than the
best hand-written template, and P-tuning's accuracy depends less on the wording it starts from
than hand-written probing depends on the wording it uses.

Set-up (the paper's LAMA protocol on the synthetic world):

- Knowledge source: `peftlab/assets/base-small`, pretrained on the world's corpus, which states
  every person's six facts in paraphrases. Frozen everywhere; only the prompt encoder trains.
- Relations: birth_city, nationality, profession, employer, instrument, friend. One prompt per
  relation (LAMA trains one per relation).
- Hand-written templates: the 9 cloze templates of each relation (world_templates.py): 7
  pretraining templates ending in "{o}." (their wording is in the corpus) and 2 held-out ones
  (never in the corpus). Prompt = the text before "{o}".
- People: prompts train on the 180 train-split people, the learning rate is chosen
  on the 60 validation people, and everything (hand-written included) is scored on the 60 test
  people. The base has read every person's facts; a prompt never sees a test person's.
- Scores: acc = greedy continuation of at most 8 tokens, cut at the first '.', exact match
  (`peftlab.train.pretrain.cloze_accuracy`'s rule; hand-written templates go through that very
  function); P@1 = LAMA's precision@1 restricted to the relation's candidates: is the answer's
  first token the highest next-token logit among the first tokens of all the relation's objects?
  P@1 does not care how the model would go on ("was born in" -> "the city of ..."), so acc - P@1
  separates output format from retrieval. Baseline: always the train people's most common object.

P-tuning conditions (virtual tokens = [P], h = MLP(E) or MLP(BiLSTM(E)), ptuning.py):

  free       "[P] [P] [P] {s} [P] [P] [P]" then the object: the paper's (3, sub, 3) shape for a
             left-to-right model; random E, MLP encoder (and LSTM), seeds 0 and 1. Its seed-0 MLP
             runs at each lr of the grid are the learning-rate selection (validation people).
  wording-i  hand-written template i with every non-subject token turned into a virtual token
             (bos stays): "As a baby, {s} lived in" -> "<s> [P]x4 {s} [P]x2". The encoder's last
             layer is solved so that its output equals those tokens' input embeddings
             (`set_encoder_output`), so at step 0 the model computes template i exactly (the script checks the step-0
             accuracy against the hand-written one); then it is trained like `free`.
  anchored-i hand-written template i's wording kept as discrete anchor tokens (the paper's
             anchors), plus 6 virtual tokens in the same places for every i:
             "<s> [P]x3 As a baby, {s} [P]x3 lived in". Same encoder seed for all i, so the 9
             runs differ only in the anchor wording.
  The spread (range, std) of the 9 trained wording-i / anchored-i prompts is compared with the
  spread of the 9 hand-written templates. Every trained prompt is saved (folded, safetensors)
  under runs/ptuning_cloze/prompts/.

Training: AdamW (no weight decay), batch 16, 100 steps (~9 epochs of 180 people), cosine schedule
with 10 warm-up steps (the trainer's `lr_factor`), gradient clipping at 1.0, loss = summed
next-token cross-entropy over the object's tokens and the closing '.' divided by their number
(`token_loss_sum`); one torch thread.

    python experiments/ptuning_cloze.py                 # everything, resumable: ~35 min on this shared
                                                        # 2-core CPU (156 short runs; stop and rerun freely)
    python experiments/ptuning_cloze.py --report-only   # rewrite the tables from the run cache

Run records are cached in runs/ptuning_cloze/records.jsonl (finished runs are skipped); the
tables go to experiments/results/ptuning_cloze.{md,csv}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftlab.data.match import exact_match  # noqa: E402
from runlog import RunCache  # noqa: E402
from ptuning_cloze_report import ANCHORED, WORDING, report  # noqa: E402
from peftlab.fileio import save_safetensors  # noqa: E402
from peftlab.data.synthworld import get_world  # noqa: E402
from peftlab.data.world_templates import HELD_OUT, PERSON_RELATIONS, PRETRAIN, cloze_prompt, is_cloze  # noqa: E402
from peftlab.models import load_pretrained  # noqa: E402
from peftlab.train.config import load_train_config  # noqa: E402
from peftlab.train.evaluate import token_loss_sum  # noqa: E402
from peftlab.train.pretrain import cloze_accuracy  # noqa: E402
from peftlab.train.trainer import lr_factor, resolve_model_path  # noqa: E402
from peftlab.tuners import get_peft_model  # noqa: E402
from peftlab.tuners.prompt import PTuningConfig  # noqa: E402
from peftlab.tuners.ptuning import collate_templates, encode_template  # noqa: E402

BASE = "small"
MAX_NEW_TOKENS = 8
BATCH = 16
WARMUP = 10
FREE_TEMPLATE = "[P] [P] [P] {s} [P] [P] [P]"
ANCHOR_P = 6                        # ANCHORED: "[P]x3 <before> {s} [P]x3 <after>"
LR_GRID = (3e-3, 1e-2, 3e-2)
STEPS = 100                         # every run; the tuning runs also report step 50
FREE_SEEDS = (0, 1)
CACHE = ROOT / "runs" / "ptuning_cloze" / "records.jsonl"
PROMPTS = ROOT / "runs" / "ptuning_cloze" / "prompts"
RESULTS = ROOT / "experiments" / "results"


# --- templates ---------------------------------------------------------------------------------
def handwritten(rel: str) -> List[Dict[str, str]]:
    """The relation's cloze templates: pretraining ones (wording in the corpus), then held-out ones."""
    out = [{"template": t, "kind": "pretrain"} for t in PRETRAIN[rel] if is_cloze(t)]
    return out + [{"template": t, "kind": "held-out"} for t in HELD_OUT[rel]]


def template_tokens(template: str, people, tok) -> tuple[List[int], List[int]]:
    """The token ids of a hand-written prompt before and after the subject (bos excluded).

    Read off the full prompt (bos + text) of each person, they must not depend on the person; the
    subject's tokens are those of `tok.encode(name)` (checked to be one contiguous run).
    """
    pattern = None
    for p in people:
        full = tok.encode(cloze_prompt(template, p.name), bos=True)[1:]
        subj = tok.encode(p.name)
        starts = [i for i in range(len(full) - len(subj) + 1) if full[i:i + len(subj)] == subj]
        if len(starts) != 1:
            raise RuntimeError(f"{template!r}: subject {p.name!r} is not one contiguous token run")
        got = (full[:starts[0]], full[starts[0] + len(subj):])
        if pattern is None:
            pattern = got
        elif got != pattern:
            raise RuntimeError(f"{template!r}: the template's tokens change with the subject ({p.name!r})")
    return pattern


def wording_template(template: str, people, tok) -> tuple[str, List[int]]:
    """(P-tuning template, init token ids): the template's non-subject tokens become [P] slots."""
    before, after = template_tokens(template, people, tok)
    return " ".join(["[P]"] * len(before) + ["{s}"] + ["[P]"] * len(after)), before + after


def anchored_rows(before: List[int], after: List[int], tok, people, rel: str, with_target: bool) -> List[dict]:
    """Rows of "<s> [P]x3 <before> {s} [P]x3 <after>" (ANCHORED, below): the hand-written wording stays as
    discrete anchor tokens, with exactly the ids it has in the hand-written prompt (encoding the anchors
    apart would turn "'s" into "▁'" "s"); the layout is `encode_template`'s."""
    k = ANCHOR_P // 2
    rows = []
    for p in people:
        subj = tok.encode(p.name)
        ids = [tok.bos_id] + [0] * k + before + subj + [0] * k + after
        slots = [-1] + list(range(k)) + [-1] * (len(before) + len(subj)) + list(range(k, 2 * k)) + [-1] * len(after)
        labels = [-100] * len(ids)
        if with_target:
            tail = tok.encode(f"{p.fact(rel)}.")
            ids, slots, labels = ids + tail, slots + [-1] * len(tail), labels + tail
        rows.append({"input_ids": ids, "prompt_slots": slots, "labels": labels})
    return rows


# --- model pieces ---------------------------------------------------------------------------------
def load_base():
    model, tok = load_pretrained(resolve_model_path(BASE), dtype=torch.float32)
    model.eval()
    return model, tok


def ptuning_model(base, n_virtual: int, encoder: str, seed: int):
    torch.manual_seed(seed)
    cfg = PTuningConfig(num_virtual_tokens=n_virtual, encoder_reparameterization_type=encoder)
    return get_peft_model(base, cfg)


@torch.no_grad()
def set_encoder_output(pm, target: torch.Tensor) -> float:
    """Make the prompt encoder output exactly `target` [N, d]; returns max |error|.

    h = W·f(E) + b, with f everything before the encoder's last Linear (ReLU MLP layers, and the
    BiLSTM for "LSTM"). Keeping E and f as initialised, [f(E), 1] [Wᵀ; b] = target is N equations
    in (hidden + 1) unknowns per output column, N <= 10 < hidden: the minimum-norm solution
    (pseudo-inverse, float64) solves it exactly. The architecture and the other weights keep their
    usual random initialisation, so training proceeds as for any P-tuning prompt."""
    enc = pm.prompt_encoder[pm.active_adapter]
    x = enc.embedding.weight
    if enc.kind == "LSTM":
        x = enc.lstm_head(x[None])[0][0]
    feats = enc.mlp_head[:-1](x).double()
    A = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.pinv(A) @ target.double()                      # [hidden + 1, d]
    last = enc.mlp_head[-1]
    last.weight.copy_(sol[:-1].T.to(last.weight.dtype))
    last.bias.copy_(sol[-1].to(last.bias.dtype))
    return float((enc() - target).abs().max())


def encode_rows(template: str, tok, people, rel: str, n_virtual: int, with_target: bool):
    return [encode_template(template, tok, {"s": p.name}, n_virtual,
                            target=f"{p.fact(rel)}." if with_target else None, bos_id=tok.bos_id,
                            record=f"{rel}/{p.name}") for p in people]


def candidate_first_tokens(world, tok, rel: str) -> List[int]:
    """First tokens of every object of `rel` in the world (the P@1 candidate set)."""
    return sorted({tok.encode(p.fact(rel))[0] for p in world.people})


def p_at_1(last_logits: torch.Tensor, answers: Sequence[str], cands: List[int], tok) -> List[bool]:
    """LAMA-style P@1 over a candidate set: is the answer's first token the top-scored candidate?"""
    c = torch.tensor(cands)
    pred = c[last_logits[:, c].argmax(-1)]
    return [int(p) == tok.encode(a)[0] for p, a in zip(pred.tolist(), answers)]


@torch.no_grad()
def plain_p_at_1(base, tok, prompts: Sequence[str], answers, cands, batch_size: int = 64) -> float:
    """P@1 of hand-written prompts (bos + text, left-padded), next-token logits of the frozen base."""
    hits = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.encode(p, bos=True) for p in prompts[i:i + batch_size]]
        b = collate_templates([{"input_ids": x, "prompt_slots": [-1] * len(x)} for x in ids], tok.pad_id)
        logits = base(b["input_ids"], attention_mask=b["attention_mask"], num_logits_to_keep=1)[:, -1]
        hits += p_at_1(logits, answers[i:i + batch_size], cands, tok)
    return sum(hits) / len(hits)


@torch.no_grad()
def slot_scores(pm, tok, rows, answers: Sequence[str], cands, batch_size: int = 64) -> Dict[str, float]:
    """{"acc": cloze_accuracy's rule (greedy, <= 8 tokens, cut at '.', exact match), "p1": P@1}."""
    pm.eval()
    hits, firsts = [], []
    for i in range(0, len(rows), batch_size):
        b = collate_templates(rows[i:i + batch_size], tok.pad_id)
        kw = dict(attention_mask=b["attention_mask"], prompt_slots=b["prompt_slots"])
        out = pm.generate(b["input_ids"], max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id, **kw)
        for row, ans in zip(out.tolist(), answers[i:i + batch_size]):
            text = tok.decode([t for t in row if t != tok.pad_id]).split(".")[0]
            hits.append(exact_match(text, ans))
        firsts += p_at_1(pm(b["input_ids"], num_logits_to_keep=1, **kw)[:, -1], answers[i:i + batch_size], cands, tok)
    return {"acc": sum(hits) / max(len(hits), 1), "p1": sum(firsts) / max(len(firsts), 1)}


def schedule_config(steps: int):
    return load_train_config(base=dict(model=BASE, data={"task": "cloze"}, max_steps=steps,
                                       warmup_steps=WARMUP, schedule="cosine"))


def train_prompt(pm, tok, rows, lr: float, steps: int, seed: int, eval_at=(), evaluate=None):
    """AdamW on the encoder; returns ({step: evaluate()} at `eval_at`, seconds of training)."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule_config(steps)
    g = torch.Generator().manual_seed(seed)
    order: List[int] = []
    evals, seconds = {}, 0.0
    for step in range(steps):
        t0 = time.time()
        pm.train()
        if len(order) < BATCH:
            order += torch.randperm(len(rows), generator=g).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        for grp in opt.param_groups:
            grp["lr"] = lr * lr_factor(step, sched)
        b = collate_templates([rows[i] for i in idx], tok.pad_id)
        logits = pm(b["input_ids"], attention_mask=b["attention_mask"], prompt_slots=b["prompt_slots"])
        loss_sum, n = token_loss_sum(logits, b["labels"])
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.time() - t0
        if step + 1 in eval_at:
            evals[step + 1] = evaluate()
    return evals, seconds


# --- run cache ----------------------------------------------------------------------------------
# --- stages -------------------------------------------------------------------------------------
def stage_handwritten(base, tok, world, cache) -> None:
    """Frozen base, each hand-written template, validation and test people."""
    for rel in PERSON_RELATIONS:
        for j, h in enumerate(handwritten(rel)):
            key = f"hand/{rel}/{j}"
            if key in cache:
                continue
            rec = {"key": key, "condition": "hand-written", "relation": rel, "template_index": j,
                   "template": h["template"], "template_kind": h["kind"]}
            cands = candidate_first_tokens(world, tok, rel)
            for split in ("validation", "test"):
                probes = [{"prompt": cloze_prompt(h["template"], p.name), "answer": p.fact(rel), "relation": rel}
                          for p in world.people_split[split]]
                rec[f"acc_{split}"] = cloze_accuracy(base, tok, probes, max_new_tokens=MAX_NEW_TOKENS)["accuracy"]
                rec[f"p1_{split}"] = plain_p_at_1(base, tok, [q["prompt"] for q in probes],
                                                  [q["answer"] for q in probes], cands)
            cache.add(rec)
            print(f"[hand] {rel:11s} {j} val {rec['acc_validation']:.3f} test {rec['acc_test']:.3f} "
                  f"(P@1 {rec['p1_test']:.3f})  {h['template']}", flush=True)


def run_ptuning(base, tok, world, rel, template, encoder, seed, lr, steps, init_ids=None, eval_at=None,
                splits=("validation", "test"), save_as: Optional[str] = None, make_rows=None):
    """Train one relation's prompt; accuracy at each `eval_at` step on `splits` (and at step 0 if
    the prompt is initialised from wording). `make_rows(people, with_target)` overrides the
    template's `encode_template` rows."""
    n_virtual = template.count("[P]")
    if make_rows is None:
        def make_rows(people, with_target):
            return encode_rows(template, tok, people, rel, n_virtual, with_target)
    pm = ptuning_model(base, n_virtual, encoder, seed)
    out: dict = {"n_virtual": n_virtual,
                 "trainable_params": sum(p.numel() for p in pm.parameters() if p.requires_grad),
                 "inference_params": n_virtual * base.config.hidden_size}
    rows = {s: make_rows(world.people_split[s], False) for s in splits}
    answers = {s: [p.fact(rel) for p in world.people_split[s]] for s in splits}
    cands = candidate_first_tokens(world, tok, rel)

    def evaluate():
        return {s: slot_scores(pm, tok, rows[s], answers[s], cands) for s in splits}

    if init_ids is not None:
        target = base.get_input_embeddings()(torch.tensor(init_ids)).detach()
        out["init_max_error"] = set_encoder_output(pm, target)
        out["step0"] = evaluate()
    train_rows = make_rows(world.people_split["train"], True)
    evals, seconds = train_prompt(pm, tok, train_rows, lr, steps, seed, eval_at or (steps,), evaluate)
    out["evals"], out["train_seconds"] = {str(k): v for k, v in evals.items()}, round(seconds, 2)
    if save_as:  # the trained (folded) prompt, for later analysis: "prompt_embeddings" [N, d]
        save_safetensors(pm.export_state_dict(), PROMPTS / f"{save_as.replace('/', '_')}.safetensors",
                         metadata={"template": template, "relation": rel})
    return out


def free_run(base, tok, world, cache, rel, encoder, seed, lr, steps, eval_at=None) -> dict:
    """The free template's run (cached): accuracy after `steps` on validation and test people."""
    key = f"free/{encoder}/{rel}/{seed}/{lr}/{steps}"
    if key not in cache:
        r = run_ptuning(base, tok, world, rel, FREE_TEMPLATE, encoder, seed, lr, steps, eval_at=eval_at, save_as=key)
        final = r["evals"][str(steps)]
        cache.add({"key": key, "condition": f"P-tuning free ({encoder})", "relation": rel, "seed": seed,
                   "encoder": encoder, "lr": lr, "steps": steps, "template": FREE_TEMPLATE,
                   "acc_validation": final["validation"]["acc"], "acc_test": final["test"]["acc"],
                   "p1_validation": final["validation"]["p1"], "p1_test": final["test"]["p1"], **r})
        print(f"[free {encoder}] {rel:11s} seed {seed} lr {lr:g}: " + " ".join(
            f"step {k} val {v['validation']['acc']:.3f}" for k, v in r["evals"].items()) +
            f"; test {final['test']['acc']:.3f} (P@1 {final['test']['p1']:.3f}, {r['train_seconds']:.0f}s)", flush=True)
    return cache[key]


def stage_tune(base, tok, world, cache) -> None:
    """The lr grid for the free template (MLP, seed 0); selection uses validation people only."""
    for rel in PERSON_RELATIONS:
        for lr in LR_GRID:
            free_run(base, tok, world, cache, rel, "MLP", 0, lr, STEPS, eval_at=(STEPS // 2, STEPS))


def pick(cache):
    """The lr whose free MLP seed-0 runs have the best mean validation accuracy over relations."""
    scores: Dict[tuple, List[float]] = {}
    for lr in LR_GRID:
        runs = [cache.get(f"free/MLP/{rel}/0/{lr}/{STEPS}") for rel in PERSON_RELATIONS]
        if all(runs):
            for k in runs[0]["evals"]:
                scores[(lr, int(k))] = [r["evals"][k]["validation"]["acc"] for r in runs]
    if not scores:
        raise SystemExit(f"no complete tuning runs in {CACHE}; run without --report-only first")
    best = max((c for c in scores if c[1] == STEPS), key=lambda c: statistics.mean(scores[c]))[0]
    return best, {f"lr={c[0]:g}, step {c[1]}": round(statistics.mean(v), 4) for c, v in sorted(scores.items())}


def stage_ptuning(base, tok, world, cache, lr, steps) -> None:
    for rel in PERSON_RELATIONS:
        for encoder in ("MLP", "LSTM"):
            for seed in FREE_SEEDS:
                free_run(base, tok, world, cache, rel, encoder, seed, lr, steps)
        for j, h in enumerate(handwritten(rel)):
            for cond in (WORDING, ANCHORED):
                key = f"{'wording' if cond == WORDING else 'anchored'}/MLP/{rel}/{j}/{lr}/{steps}"
                if key in cache:
                    continue
                before, after = template_tokens(h["template"], world.people, tok)
                if cond == WORDING:
                    text, ids = wording_template(h["template"], world.people, tok)
                    r = run_ptuning(base, tok, world, rel, text, "MLP", 0, lr, steps, init_ids=ids, save_as=key)
                else:
                    text = " ".join(["[P]"] * (ANCHOR_P // 2) + [cloze_prompt(h["template"], "{s}")]).replace(
                        "{s}", "{s} " + " ".join(["[P]"] * (ANCHOR_P // 2)), 1)
                    r = run_ptuning(base, tok, world, rel, text, "MLP", 0, lr, steps, save_as=key,
                                    make_rows=lambda people, t, b=before, a=after: anchored_rows(b, a, tok, people, rel, t))
                final = r["evals"][str(steps)]
                cache.add({"key": key, "condition": cond, "relation": rel, "template_index": j,
                           "template": h["template"], "template_kind": h["kind"], "ptuning_template": text,
                           "encoder": "MLP", "seed": 0, "lr": lr, "steps": steps,
                           "acc_validation": final["validation"]["acc"], "acc_test": final["test"]["acc"],
                           "p1_validation": final["validation"]["p1"], "p1_test": final["test"]["p1"], **r})
                start = (f"step0 test {r['step0']['test']['acc']:.3f} -> " if "step0" in r else "")
                print(f"[{cond}] {rel:11s} {j}: {start}test {final['test']['acc']:.3f} (P@1 {final['test']['p1']:.3f}, "
                      f"{r['train_seconds']:.0f}s)  {text}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = RunCache(CACHE)
    t0 = time.time()
    if not args.report_only:
        base, tok = load_base()
        world = get_world(0)
        stage_handwritten(base, tok, world, cache)
        stage_tune(base, tok, world, cache)
    lr, tune_table = pick(cache)
    print(f"[tune] chosen lr={lr:g}; mean validation accuracy {tune_table}", flush=True)
    if not args.report_only:
        stage_ptuning(base, tok, world, cache, lr, STEPS)
    setup = {"base": BASE, "steps": STEPS, "batch": BATCH, "free_template": FREE_TEMPLATE,
             "free_seeds": list(FREE_SEEDS)}
    report(cache, lr, tune_table, setup, RESULTS)
    print(f"[done] {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
