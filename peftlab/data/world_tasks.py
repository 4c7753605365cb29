"""Fine-tuning tasks of the synthetic world, as LLaMA-Factory records (alpaca / sharegpt).

Six tasks; people (and skill items) of the test split never appear in the train split, and test
also uses question/instruction templates that train never shows (`"held_out": true`):

  cloze      alpaca   "Ru Dakthorn was born in the city of" -> "Vendrath"   (also plain text)
  qa         alpaca   "Where was Ru Dakthorn born?" -> "Vendrath"
  dialogue   sharegpt three questions about one person, answered in full sentences
  classify   alpaca   "Which country does Ru Dakthorn come from? Answer with one of: ..." ->
                      one country name, a single token of the project tokenizer
  data2text  alpaca   "name: ...\\nprofession: baker" -> a sentence; `references` lists several
  skills     alpaca   2-digit addition, reversing and upper-casing invented words (exact answers)

Extra keys (relation, entity, template, held_out, references, ...) are metadata for evaluation;
LLaMA-Factory ignores them through the column mapping of `dataset_info()`, and
`peftlab.data.formats` keeps them in `Example.meta`.
"""
from __future__ import annotations

import itertools
import random
from typing import Dict, List

from .world_templates import (ANSWERS, CLASSIFY_HELD_OUT, CLASSIFY_INSTRUCTIONS, CLAUSES,
                              DATA2TEXT_INSTRUCTIONS, DIALOGUE_SYSTEM, FIELD_NAMES,
                              HELD_OUT, HELD_OUT_QUESTIONS, PERSON_RELATIONS, PRETRAIN, QUESTIONS,
                              SKILL_HELD_OUT, SKILL_INSTRUCTIONS, cloze_prompt, fill, is_cloze)

TASK_FORMATS = {"cloze": "alpaca", "qa": "alpaca", "dialogue": "sharegpt", "classify": "alpaca",
                "data2text": "alpaca", "skills": "alpaca"}
SPLITS = ("train", "validation", "test")


def _alpaca(instruction: str, output: str, input: str = "", **meta) -> dict:
    return {"instruction": instruction, "input": input, "output": output, **meta}


def _cloze(world, rng: random.Random, split: str) -> List[dict]:
    out = []
    for p in world.people_split[split]:
        for r in PERSON_RELATIONS:
            seen = [t for t in PRETRAIN[r] if is_cloze(t)]
            temps = [(rng.choice(seen), False)]
            if split == "test":
                temps.append((rng.choice(HELD_OUT[r]), True))
            for t, held in temps:
                out.append(_alpaca(cloze_prompt(t, p.name), p.fact(r), relation=r, entity=p.name,
                                   template=t, held_out=held))
    return out


def _qa(world, rng: random.Random, split: str) -> List[dict]:
    out = []
    for p in world.people_split[split]:
        for r in PERSON_RELATIONS:
            temps = [(rng.choice(QUESTIONS[r]), False)]
            if split == "test":
                temps.append((HELD_OUT_QUESTIONS[r], True))
            for q, held in temps:
                out.append(_alpaca(q.replace("{s}", p.name), p.fact(r), relation=r, entity=p.name,
                                   template=q, held_out=held))
    return out


def _dialogue(world, rng: random.Random, split: str) -> List[dict]:
    out = []
    per_person = 2 if split == "train" else 1
    for p in world.people_split[split]:
        for k in range(per_person):
            rels = rng.sample(PERSON_RELATIONS, 3)
            held = split == "test" and k == 0 and rng.random() < 0.5
            conv = []
            for j, r in enumerate(rels):
                q = HELD_OUT_QUESTIONS[r] if held and j == len(rels) - 1 else rng.choice(QUESTIONS[r])
                conv += [{"from": "human", "value": q.replace("{s}", p.name)},
                         {"from": "gpt", "value": fill(ANSWERS[r], p.name, p.fact(r))}]
            out.append({"conversations": conv, "system": DIALOGUE_SYSTEM, "entity": p.name,
                        "relations": rels, "held_out": held})
    return out


def _classify(world, rng: random.Random, split: str) -> List[dict]:
    labels = ", ".join(world.class_labels)
    out = []
    for p in world.people_split[split]:
        if split == "train":
            temps = [(t, False) for t in rng.sample(CLASSIFY_INSTRUCTIONS, 2)]
        elif split == "validation":
            temps = [(rng.choice(CLASSIFY_INSTRUCTIONS), False)]
        else:
            temps = [(rng.choice(CLASSIFY_INSTRUCTIONS), False), (CLASSIFY_HELD_OUT, True)]
        for t, held in temps:
            out.append(_alpaca(t.format(s=p.name, labels=labels), p.nationality, entity=p.name,
                               template=t, held_out=held))
    return out


def _references(name: str, facts: Dict[str, str], rng: random.Random, limit: int = 8) -> List[str]:
    """Sentences stating `facts` about `name`: every order and wording, canonical first."""
    rels = list(facts)
    sents = []
    for order in itertools.permutations(rels):
        for words in itertools.product(*[CLAUSES[r] for r in order]):
            clauses = [w.replace("{o}", facts[r]) for w, r in zip(words, order)]
            body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
            sents.append(f"{name} {body}.")
    first, rest = sents[0], sents[1:]
    return [first] + rng.sample(rest, min(limit - 1, len(rest)))


def _data2text(world, rng: random.Random, split: str) -> List[dict]:
    out = []
    per_person = 2 if split == "train" else 1
    for p in world.people_split[split]:
        for _ in range(per_person):
            rels = rng.sample(list(CLAUSES), rng.randint(1, 3))
            facts = {r: p.fact(r) for r in rels}
            record = "\n".join([f"name: {p.name}"] + [f"{FIELD_NAMES[r]}: {v}" for r, v in facts.items()])
            refs = _references(p.name, facts, rng)
            output = rng.choice(refs) if split == "train" else refs[0]
            out.append(_alpaca(rng.choice(DATA2TEXT_INSTRUCTIONS), output, input=record,
                               entity=p.name, fields=["name"] + rels, references=refs))
    return out


def _skill(kind: str, item, instruction: str, held: bool) -> dict:
    if kind == "add":
        a, b = item
        return _alpaca(instruction.format(a=a, b=b), str(a + b), skill=kind, item=[a, b],
                       template=instruction, held_out=held)
    answer = item[::-1] if kind == "reverse" else item.upper()
    return _alpaca(instruction.format(w=item), answer, skill=kind, item=item, template=instruction,
                   held_out=held)


def _skills(world, rng: random.Random, split: str) -> List[dict]:
    n = {"train": 400, "validation": 50, "test": 100}[split]
    out = []
    for kind in ("add", "reverse", "upper"):
        pool = world.add_pairs[split] if kind == "add" else world.words[split]
        items = [pool[i % len(pool)] for i in range(n)] if kind != "add" else pool[:n]
        for i, item in enumerate(items):
            held = split == "test" and i % 2 == 1
            ins = SKILL_HELD_OUT[kind] if held else rng.choice(SKILL_INSTRUCTIONS[kind])
            out.append(_skill(kind, item, ins, held))
    return out


_BUILDERS = {"cloze": _cloze, "qa": _qa, "dialogue": _dialogue, "classify": _classify,
             "data2text": _data2text, "skills": _skills}


def build_tasks(world) -> Dict[str, Dict[str, List[dict]]]:
    """{task: {split: [record, ...]}} for every task of `TASK_FORMATS`."""
    return {task: {split: _BUILDERS[task](world, random.Random(f"{world.seed}:task:{task}:{split}"), split)
                   for split in SPLITS}
            for task in TASK_FORMATS}


def dataset_info() -> Dict[str, dict]:
    """LLaMA-Factory `dataset_info.json`: one entry per task and split, plus the pretraining text."""
    info: Dict[str, dict] = {"synthworld_pretrain": {"file_name": "pretrain.jsonl", "columns": {"prompt": "text"}}}
    for task, fmt in TASK_FORMATS.items():
        for split in SPLITS:
            entry: dict = {"file_name": f"{task}/{split}.json", "formatting": fmt}
            if fmt == "alpaca":
                entry["columns"] = {"prompt": "instruction", "query": "input", "response": "output",
                                    "system": "system", "history": "history"}
            else:
                entry["columns"] = {"messages": "conversations", "system": "system", "tools": "tools"}
                entry["tags"] = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                 "assistant_tag": "gpt", "observation_tag": "observation",
                                 "function_tag": "function_call", "system_tag": "system"}
            info[f"synthworld_{task}_{split}"] = entry
    return info
