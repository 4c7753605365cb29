"""Tables of experiments/ptuning_cloze.py (P-tuning vs hand-written cloze templates) from its run cache.

Reads the run records only (one per hand-written template, P-tuning run and condition) and
writes experiments/results/ptuning_cloze.{md,csv}: whether P-tuning beats the best hand-written
template per relation, the spread across the 9 paraphrase templates (range, std), LAMA-style P@1,
a breakdown of what the spread follows, and the verdicts with their numbers. The set-up is
described in ptuning_cloze.py's docstring.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from peftlab.data.synthworld import get_world
from peftlab.data.world_templates import PERSON_RELATIONS
from runlog import environment

HAND = "hand-written"
WORDING = "P-tuning wording-init (MLP)"
ANCHORED = "P-tuning anchored (MLP)"


def spread(xs: Sequence[float]) -> dict:
    return {"best": max(xs), "worst": min(xs), "mean": statistics.mean(xs), "range": max(xs) - min(xs),
            "std": statistics.pstdev(xs)}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _records(cache, condition: str, rel: str, lr: Optional[float] = None, steps: Optional[int] = None) -> List[dict]:
    rs = [r for r in cache.values() if r.get("condition") == condition and r["relation"] == rel
          and (lr is None or (r["lr"] == lr and r["steps"] == steps))]
    return sorted(rs, key=lambda r: (r.get("template_index", 0), r.get("seed", 0)))


def majority_accuracy(world, rel: str) -> float:
    """Always answering the train people's most frequent object (the prior a prompt could learn)."""
    counts: Dict[str, int] = {}
    for p in world.people_split["train"]:
        counts[p.fact(rel)] = counts.get(p.fact(rel), 0) + 1
    top = max(counts, key=lambda a: (counts[a], a))
    return statistics.mean(p.fact(rel) == top for p in world.people_split["test"])


def summarize(cache, lr: float, steps: int) -> Dict[str, dict]:
    """Per relation: hand-written spread, P-tuning free (mean over seeds), wording-init and anchored spreads."""
    world = get_world(0)
    out = {}
    for rel in PERSON_RELATIONS:
        hand = _records(cache, HAND, rel)
        row: dict = {"majority": majority_accuracy(world, rel), "n_templates": len(hand)}
        if hand:
            row["hand"] = spread([r["acc_test"] for r in hand])
            row["hand_p1"] = spread([r["p1_test"] for r in hand])
            # the template one would pick without test labels: best on validation people
            row["hand_val_pick"] = max(hand, key=lambda r: (r["acc_validation"], -r["template_index"]))["acc_test"]
        for enc in ("MLP", "LSTM"):
            fr = _records(cache, f"P-tuning free ({enc})", rel, lr, steps)
            if fr:
                row[f"free_{enc}"] = statistics.mean(r["acc_test"] for r in fr)
                row[f"free_{enc}_p1"] = statistics.mean(r["p1_test"] for r in fr)
                row[f"free_{enc}_seeds"] = [r["acc_test"] for r in fr]
        for short, cond in (("word", WORDING), ("anch", ANCHORED)):
            rs = _records(cache, cond, rel, lr, steps)
            if hand and len(rs) == len(hand):
                row[short] = spread([r["acc_test"] for r in rs])
                row[f"{short}_p1"] = spread([r["p1_test"] for r in rs])
                row[f"{short}_val_pick"] = max(rs, key=lambda r: (r["acc_validation"], -r["template_index"]))["acc_test"]
        word = _records(cache, WORDING, rel, lr, steps)
        if word and len(word) == len(hand):
            row["step0_matches_hand"] = sum(abs(w["step0"]["test"]["acc"] - h["acc_test"]) < 1e-9
                                            for w, h in zip(word, hand))
        out[rel] = row
    return out


GROUPS = {"all 6 relations": PERSON_RELATIONS,
          "instrument, nationality, profession": ("instrument", "nationality", "profession"),
          "birth_city, employer, friend": ("birth_city", "employer", "friend")}


def _get(row: dict, key: str, sub: Optional[str] = None) -> Optional[float]:
    v = row.get(key)
    return v if sub is None or v is None else v[sub]


def _mean(summ, key: str, sub: Optional[str], rels) -> Optional[float]:
    vals = [_get(summ[r], key, sub) for r in rels]
    return None if any(v is None for v in vals) else statistics.mean(vals)


def range_noise_floor(p: float, n: int) -> float:
    """Expected max - min of 9 accuracies that differ only by binomial noise (n trials, rate p):
    E[range of 9 standard normals] = 2.970 times the standard error sqrt(p(1-p)/n)."""
    return 2.970 * math.sqrt(p * (1 - p) / n)


def verdicts(summ: Dict[str, dict]) -> List[str]:
    """The claim's two parts, per relation and averaged, as sentences with the numbers."""
    out = []
    done = [r for r in PERSON_RELATIONS if "hand" in summ[r] and "free_MLP" in summ[r]]
    if done:
        beats = [r for r in done if summ[r]["free_MLP"] > summ[r]["hand"]["best"]]
        out.append(f"- Beat the best hand-written template: P-tuning free (MLP, mean of seeds) is above the best "
                   f"hand-written template (picked on test: an oracle) on {len(beats)}/{len(done)} relations "
                   f"({', '.join(beats) or 'none'}); mean over relations {_pct(_mean(summ, 'free_MLP', None, done))}% "
                   f"vs {_pct(_mean(summ, 'hand', 'best', done))}% (exact match); P@1 "
                   f"{_pct(_mean(summ, 'free_MLP_p1', None, done))}% vs {_pct(_mean(summ, 'hand_p1', 'best', done))}%.")
    for short, name in (("word", "wording-init"), ("anch", "anchored")):
        done = [r for r in PERSON_RELATIONS if "hand" in summ[r] and short in summ[r]]
        if not done:
            continue
        narrower = [r for r in done if summ[r][short]["range"] < summ[r]["hand"]["range"] - 1e-9]
        out.append(f"- Shrink the spread ({name}): across the 9 wordings the range (max-min) after P-tuning is "
                   f"narrower than the hand-written range on {len(narrower)}/{len(done)} relations "
                   f"({', '.join(narrower) or 'none'}); mean range {_pct(_mean(summ, short, 'range', done))} vs "
                   f"{_pct(_mean(summ, 'hand', 'range', done))} points, mean std {_pct(_mean(summ, short, 'std', done))} "
                   f"vs {_pct(_mean(summ, 'hand', 'std', done))}; mean accuracy {_pct(_mean(summ, short, 'mean', done))}% "
                   f"vs {_pct(_mean(summ, 'hand', 'mean', done))}%, worst wording {_pct(_mean(summ, short, 'worst', done))}% "
                   f"vs {_pct(_mean(summ, 'hand', 'worst', done))}%.")
    done = [r for r in PERSON_RELATIONS if "anch" in summ[r]]
    if done:
        floor = {r: range_noise_floor(summ[r]["anch"]["mean"], len(get_world(0).people_split["test"])) for r in done}
        out.append("- Noise floor: with no real difference between 9 templates, each scored on 60 people, the expected "
                   "range is about 3 binomial standard errors: " + ", ".join(f"{r} {_pct(floor[r])}" for r in done) +
                   " points at the anchored mean accuracy; anchored ranges at or below it: " +
                   (", ".join(r for r in done if summ[r]["anch"]["range"] <= floor[r] + 1e-9) or "none") + ".")
    done = [r for r in PERSON_RELATIONS if "step0_matches_hand" in summ[r]]
    if done:
        ok = sum(summ[r]["step0_matches_hand"] for r in done)
        out.append(f"- Sanity: at step 0 the wording-initialised prompts reproduce the hand-written test accuracy "
                   f"exactly for {ok}/{sum(summ[r]['n_templates'] for r in done)} templates.")
    return out


def breakdown(cache, lr: float, steps: int) -> List[str]:
    """Mean accuracy by template group: virtual tokens before the subject in the wording-init layout
    (none vs some: can the prompt act on the subject's tokens?) and pretraining vs held-out wording."""
    groups: Dict[str, List[tuple]] = {}
    for rel in PERSON_RELATIONS:
        word = {r["template_index"]: r for r in _records(cache, WORDING, rel, lr, steps)}
        anch = {r["template_index"]: r for r in _records(cache, ANCHORED, rel, lr, steps)}
        for h in _records(cache, HAND, rel):
            wr, ar = word.get(h["template_index"]), anch.get(h["template_index"])
            if wr is None or ar is None:
                continue
            before = wr["ptuning_template"].split("{s}")[0].count("[P]")
            row = (h["acc_test"], wr["acc_test"], ar["acc_test"])
            groups.setdefault("words before the subject: none" if before == 0 else "words before the subject: some",
                              []).append(row)
            groups.setdefault(f"{h['template_kind']} templates", []).append(row)
    return [f"| {name} | {len(rs)} | " + " | ".join(_pct(statistics.mean(x[i] for x in rs)) for i in range(3)) + " |"
            for name, rs in sorted(groups.items())]


def write_csv(cache, env, path: Path) -> None:
    fields = ["condition", "relation", "template_index", "template", "template_kind", "ptuning_template", "encoder",
              "seed", "lr", "steps", "n_virtual", "trainable_params", "inference_params", "acc_step0_test",
              "p1_step0_test", "acc_validation", "acc_test", "p1_validation", "p1_test", "train_seconds",
              "init_max_error", "date", "cpu", "torch", "threads"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in sorted(cache.values(), key=lambda r: r["key"]):
            s0 = r.get("step0", {}).get("test", {})
            w.writerow({**r, "acc_step0_test": s0.get("acc"), "p1_step0_test": s0.get("p1"), **env})


def _table(summ, header: List[str], cols) -> List[str]:
    L = ["| relation | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for rel in PERSON_RELATIONS:
        L.append(f"| {rel} | " + " | ".join(_pct(_get(summ[rel], k, sub)) for k, sub in cols) + " |")
    for name, rels in GROUPS.items():
        L.append(f"| **mean, {name}** | " + " | ".join(_pct(_mean(summ, k, sub, rels)) for k, sub in cols) + " |")
    return L


def report(cache, lr: float, tune_table: Dict[str, float], setup: dict, results: Path) -> None:
    """Write ptuning_cloze.md / .csv under `results`; `setup`: base, steps, batch, free_template, free_seeds."""
    steps = setup["steps"]
    summ = summarize(cache, lr, steps)
    env = environment()
    results.mkdir(parents=True, exist_ok=True)
    write_csv(cache, env, results / "ptuning_cloze.csv")
    L = [f"# P-tuning vs hand-written cloze templates (frozen base-{setup['base']})", "",
         f"Generated by `experiments/ptuning_cloze.py` on {env['date']}; CPU: {env['cpu']}, {env['threads']} torch "
         f"thread; torch {env['torch']}.", "",
         "Test = the 60 test-split people per relation (binomial standard error about 6 points at 50%). "
         "**acc** = exact match of the greedy continuation (<= 8 tokens, cut at '.'), the rule of `cloze_accuracy`; "
         "**P@1** = the answer's first token is the top next-token logit among the first tokens of all objects of "
         "the relation (LAMA's metric restricted to candidates; insensitive to output format; for `friend` it only "
         "checks the first name, 57 candidates). Prompts train on the 180 train people; lr is chosen on the 60 "
         "validation people. **Hand-written**: the relation's 9 cloze templates (7 pretraining + 2 held-out), "
         f"frozen base. **Free**: `{setup['free_template']}`, MLP or LSTM encoder, mean of seeds {setup['free_seeds']}. "
         "**Wording-init**: each hand-written template's own tokens become the virtual tokens (MLP encoder's last layer solved "
         "so that it outputs their embeddings, so step 0 = the hand-written prompt), then trained. **Anchored**: each hand-written "
         "template's wording kept as discrete anchors plus the same 6 virtual tokens for all, "
         "`[P]x3 <words before> {s} [P]x3 <words after>` (same encoder seed for all 9). All P-tuning: lr "
         f"{lr:g}, {steps} steps, batch {setup['batch']}. 'picked on val' = the template with the best validation accuracy.",
         "", "## 1. Does P-tuning beat the best hand-written template? (test acc %)", ""]
    L += _table(summ, ["majority answer", "hand best (oracle)", "hand picked on val", "P-t free MLP", "P-t free LSTM",
                       "wording-init picked on val", "anchored picked on val"],
                [("majority", None), ("hand", "best"), ("hand_val_pick", None), ("free_MLP", None), ("free_LSTM", None),
                 ("word_val_pick", None), ("anch_val_pick", None)])
    L += ["", "## 2. Spread across the 9 paraphrase templates (test acc %)", ""]
    L += _table(summ, ["hand mean", "hand worst", "hand range", "hand std", "wording-init mean", "worst", "range",
                       "std", "anchored mean", "worst", "range", "std"],
                [("hand", "mean"), ("hand", "worst"), ("hand", "range"), ("hand", "std"), ("word", "mean"),
                 ("word", "worst"), ("word", "range"), ("word", "std"), ("anch", "mean"), ("anch", "worst"),
                 ("anch", "range"), ("anch", "std")])
    L += ["", "## 3. P@1 over the relation's candidates (test, %)", ""]
    L += _table(summ, ["hand best", "hand mean", "hand range", "P-t free MLP", "P-t free LSTM", "wording-init mean",
                       "range", "anchored mean", "range"],
                [("hand_p1", "best"), ("hand_p1", "mean"), ("hand_p1", "range"), ("free_MLP_p1", None),
                 ("free_LSTM_p1", None), ("word_p1", "mean"), ("word_p1", "range"), ("anch_p1", "mean"),
                 ("anch_p1", "range")])
    L += ["", "## 4. What the spread follows (test acc %, mean over the templates of all 6 relations)", "",
          "| templates | n | hand-written | wording-init trained | anchored trained |", "|---|---:|---:|---:|---:|"]
    L += breakdown(cache, lr, steps)
    L += ["", "## Verdicts (computed)", ""] + verdicts(summ)
    L += ["", "## Per template (test acc %)", "",
          "| relation | # | kind | hand-written template | [P] before subject (wording-init) | hand | hand P@1 | "
          "wording-init step 0 | wording-init trained | anchored trained |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for rel in PERSON_RELATIONS:
        word = {r["template_index"]: r for r in _records(cache, WORDING, rel, lr, steps)}
        anch = {r["template_index"]: r for r in _records(cache, ANCHORED, rel, lr, steps)}
        for h in _records(cache, HAND, rel):
            j = h["template_index"]
            wr, ar = word.get(j), anch.get(j)
            before = wr["ptuning_template"].split("{s}")[0].count("[P]") if wr else "-"
            L.append(f"| {rel} | {j} | {h['template_kind']} | `{h['template']}` | {before} | {_pct(h['acc_test'])} | "
                     f"{_pct(h['p1_test'])} | {_pct(wr['step0']['test']['acc'] if wr else None)} | "
                     f"{_pct(wr['acc_test'] if wr else None)} | {_pct(ar['acc_test'] if ar else None)} |")
    L += ["", "## Free-template seeds (test acc %)", "", "| relation | MLP seeds | LSTM seeds |", "|---|---|---|"]
    for rel in PERSON_RELATIONS:
        L.append(f"| {rel} | " + " | ".join(", ".join(_pct(x) for x in summ[rel].get(f"free_{e}_seeds", []))
                                             for e in ("MLP", "LSTM")) + " |")
    L += ["", "## Learning-rate selection (P-tuning free, MLP, seed 0; mean validation acc over the 6 relations, %)", "",
          "| lr, step | validation |", "|---|---:|"] + [f"| {k} | {_pct(v)} |" for k, v in tune_table.items()]
    L += ["", f"Chosen: lr {lr:g} (best at step {steps}), used for every P-tuning run above.", ""]
    (results / "ptuning_cloze.md").write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))


