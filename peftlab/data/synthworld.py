"""A deterministic fictional world to pretrain on, and fine-tuning tasks built from it.

Why: a fine-tuning experiment needs a base model that knows something the task can draw on, and
a test that cannot be passed by memorising the fine-tuning set. Real facts leak from real
pretraining; invented ones cannot. The world has

    countries (5)  - capital city
    cities (45)    - country
    organisations  - headquarters city, founding year, industry
    people (300)   - birth_city, nationality (= country of birth_city), profession, employer,
                     instrument, friend (another person)

with syllable names no model has seen (`names.py`). `pretrain_texts()` states every fact in
several paraphrases and in biographies whose sentence order is shuffled (Allen-Zhu & Li,
arXiv:2309.14316, Sec. 4-5: without such diversity facts are memorised but not extractable);
a few templates per relation are held out of it and used only to probe (`world_templates.py`).

People are split 60/20/20 into train/validation/test. Every person's facts are in the pretraining
corpus; the fine-tuning tasks (`world_tasks.py`) ask about train people in the train split and
about unseen people at test, so fine-tuning must teach the format and the knowledge must come from
pretraining.

Determinism: every random choice comes from `random.Random(f"{seed}:{stream}")` (string seeds are
hashed with SHA-512 by Python, independent of PYTHONHASHSEED), and files are written with fixed
key order, so the same seed gives byte-identical files.

    python -m peftlab.data.synthworld --out data/synthworld --seed 0
    python -m peftlab.data.synthworld --tokenizer-out peftlab/assets/tokenizer/tokenizer.model --vocab-size 2048
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from ..errors import ConfigError
from ..fileio import atomic_write, write_json
from .formats import Example, parse_record
from .match import exact_match, normalize_answer  # noqa: F401  (re-exported evaluation helpers)
from .names import NameMaker, check_unique
from .world_templates import (HELD_OUT, INDUSTRIES, INSTRUMENTS, ORG_SUFFIXES, PERSON_RELATIONS,
                              PLACE_TEMPLATES, PRETRAIN, PROFESSIONS, SKILL_PRACTICE, cloze_prompt,
                              fill, is_cloze)
from .world_tasks import SPLITS, TASK_FORMATS, build_tasks, dataset_info


@dataclass(frozen=True)
class Country:
    name: str
    capital: str


@dataclass(frozen=True)
class City:
    name: str
    country: str


@dataclass(frozen=True)
class Org:
    name: str
    hq_city: str
    founded: int
    industry: str


@dataclass(frozen=True)
class Person:
    name: str
    birth_city: str
    nationality: str
    profession: str
    employer: str
    instrument: str
    friend: str

    def fact(self, relation: str) -> str:
        return getattr(self, relation)


class SynthWorld:
    """The world for one seed (module docstring). Sizes are keyword arguments."""

    def __init__(self, seed: int = 0, n_people: int = 300, n_cities: int = 45, n_orgs: int = 15,
                 n_countries: int = 5, n_bios: int = 8, n_first_names: int = 60,
                 n_skill_words: int = 500):
        if n_cities < n_countries or n_people < 10 or n_orgs < 1 or n_bios < 1:
            raise ConfigError("SynthWorld needs n_cities >= n_countries, n_people >= 10, n_orgs >= 1, n_bios >= 1")
        self.seed = int(seed)
        self.n_bios = n_bios
        names = NameMaker(self._rng("names"))
        country_names = names.names(n_countries, min_syll=2, max_syll=3, min_len=5, max_len=9)
        city_names = names.names(n_cities, min_syll=2, max_syll=2, min_len=5, max_len=9)
        org_names = [f"{names.name(min_syll=2, max_syll=2)} {ORG_SUFFIXES[i % len(ORG_SUFFIXES)]}"
                     for i in range(n_orgs)]
        first = names.names(n_first_names, min_syll=2, max_syll=2, min_len=4, max_len=7)
        last = names.names(n_people, min_syll=2, max_syll=2, min_len=5, max_len=9)
        self.skill_words: List[str] = []
        while len(self.skill_words) < n_skill_words:  # no palindromes: reversing must change them
            w = names.word(min_syll=1, max_syll=2, min_len=3, max_len=5)
            if w != w[::-1]:
                self.skill_words.append(w)

        rng = self._rng("facts")
        self.cities = [City(c, country_names[i % n_countries]) for i, c in enumerate(city_names)]
        self.countries = [Country(c, next(x.name for x in self.cities if x.country == c))
                          for c in country_names]
        self.orgs = [Org(o, rng.choice(city_names), rng.randint(1820, 1995), rng.choice(INDUSTRIES))
                     for o in org_names]
        full = [f"{rng.choice(first)} {ln}" for ln in last]
        city_of = {c.name: c for c in self.cities}
        people = []
        for i, name in enumerate(full):
            city = rng.choice(city_names)
            friend = rng.choice([f for j, f in enumerate(full) if j != i])
            people.append(Person(name, city, city_of[city].country, rng.choice(PROFESSIONS),
                                 rng.choice(org_names), rng.choice(INSTRUMENTS), friend))
        self.people = people
        check_unique([p.name for p in people] + city_names + country_names + org_names, "entity")

        order = list(range(n_people))
        self._rng("splits").shuffle(order)
        a, b = int(0.6 * n_people), int(0.8 * n_people)
        self.people_split: Dict[str, List[Person]] = {
            "train": [people[i] for i in sorted(order[:a])],
            "validation": [people[i] for i in sorted(order[a:b])],
            "test": [people[i] for i in sorted(order[b:])],
        }
        self._skill_split()

    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.seed}:{stream}")

    def _skill_split(self) -> None:
        """Disjoint addition pairs and words for the skills task's splits."""
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
        rng = self._rng("skills-split")
        rng.shuffle(pairs)
        words = list(self.skill_words)
        rng.shuffle(words)
        n = len(words)
        self.add_pairs = {"test": pairs[:300], "validation": pairs[300:450], "train": pairs[450:]}
        self.words = {"test": words[:n // 5], "validation": words[n // 5:2 * n // 5],
                      "train": words[2 * n // 5:]}

    # ------------------------------------------------------------------------- labels
    @property
    def class_labels(self) -> List[str]:
        """The classification task's labels: the country names (sorted)."""
        return sorted(c.name for c in self.countries)

    def tokenizer_symbols(self) -> List[str]:
        """Word-initial pieces that must be single tokens ("\u2581" + label), for `Tokenizer.train`."""
        return ["\u2581" + c for c in self.class_labels]

    # ------------------------------------------------------------------------- corpus
    def pretrain_texts(self) -> List[str]:
        """The pretraining documents (biographies, place and organisation notes, practice), shuffled."""
        rng = self._rng("corpus")
        docs: List[str] = []
        for p in self.people:
            # each relation cycles through its templates in a person-specific order, so every
            # pretraining template states every fact at least once when n_bios >= #templates
            cycle = {r: rng.sample(PRETRAIN[r], len(PRETRAIN[r])) for r in PERSON_RELATIONS}
            for k in range(self.n_bios):
                rels = list(PERSON_RELATIONS)
                rng.shuffle(rels)
                docs.append(" ".join(fill(cycle[r][k % len(cycle[r])], p.name, p.fact(r)) for r in rels))
        for c in self.cities:
            for t in PLACE_TEMPLATES["city_country"]:
                docs.append(fill(t, c.name, c.country))
        for c in self.countries:
            cities = [x.name for x in self.cities if x.country == c.name]
            listing = f"The cities of {c.name} are {', '.join(cities[:-1])} and {cities[-1]}."
            for t in PLACE_TEMPLATES["capital"]:
                docs.append(f"{fill(t, c.name, c.capital)} {listing}")
        for o in self.orgs:
            facts = [("org_hq", o.hq_city), ("org_founded", str(o.founded)), ("org_industry", o.industry)]
            for k in range(4):
                rng.shuffle(facts)
                docs.append(" ".join(fill(PLACE_TEMPLATES[r][k % len(PLACE_TEMPLATES[r])], o.name, v)
                                     for r, v in facts))
        docs.extend(self._practice(rng))
        rng.shuffle(docs)
        return docs

    def _practice(self, rng: random.Random) -> List[str]:
        """Arithmetic and string practice on train-split items only, 8 lines per document."""
        lines = []
        for a, b in self.add_pairs["train"][:1600]:
            lines.append(rng.choice(SKILL_PRACTICE["add"]).format(a=a, b=b, c=a + b))
        for w in self.words["train"]:
            lines.append(rng.choice(SKILL_PRACTICE["reverse"]).format(w=w, r=w[::-1]))
            lines.append(rng.choice(SKILL_PRACTICE["upper"]).format(w=w, u=w.upper()))
        rng.shuffle(lines)
        return [" ".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]

    def cloze_probes(self, people: Optional[Sequence[Person]] = None, held_out: bool = True) -> List[Dict]:
        """Plain-text probes: {"prompt", "answer", "relation", "entity", "template", "held_out"}.

        With `held_out=True` the held-out templates (never in the corpus), else the pretraining
        cloze templates. Score a base model by greedy continuation of `prompt` (with bos) and
        `exact_match(continuation, answer)`.
        """
        people = self.people if people is None else people
        out = []
        for p in people:
            for r in PERSON_RELATIONS:
                temps = HELD_OUT[r] if held_out else [t for t in PRETRAIN[r] if is_cloze(t)]
                for t in temps:
                    out.append({"prompt": cloze_prompt(t, p.name), "answer": p.fact(r), "relation": r,
                                "entity": p.name, "template": t, "held_out": held_out})
        return out

    def to_json(self) -> Dict:
        """All facts, splits and templates (what `world.json` holds)."""
        return {
            "seed": self.seed,
            "countries": [asdict(c) for c in self.countries],
            "cities": [asdict(c) for c in self.cities],
            "orgs": [asdict(o) for o in self.orgs],
            "people": [asdict(p) for p in self.people],
            "people_split": {s: [p.name for p in ps] for s, ps in self.people_split.items()},
            "class_labels": self.class_labels,
            "templates": {"pretrain": PRETRAIN, "held_out": HELD_OUT, "places": PLACE_TEMPLATES},
        }

    def tokenizer_corpus(self) -> Iterator[str]:
        """Texts to train a tokenizer on: the pretraining corpus, then every task record rendered
        as the default chat template renders it (so headers like "### User:" become pieces)."""
        yield from self.pretrain_texts()
        tasks = build_tasks(self)
        for task in TASK_FORMATS:
            for split in SPLITS:
                for i, rec in enumerate(tasks[task][split]):
                    ex = parse_record(rec, TASK_FORMATS[task], f"{task}/{split}: record {i}")
                    yield _render_default(ex)


def _render_default(ex: Example) -> str:
    """The default chat template as text (for tokenizer training; see `peftlab.tokenizer`)."""
    parts = [ex.system + "\n"] if ex.system else []
    for m in ex.messages:
        if m.role == "user":
            parts.append(f"### User: {m.content}\n### Assistant:")
        elif m.role == "observation":
            parts.append(f"### Observation: {m.content}\n### Assistant:")
        else:
            parts.append(f" {m.content}")
    return "".join(parts)


# ----------------------------------------------------------------------------- module-level API
@functools.lru_cache(maxsize=4)
def get_world(seed: int = 0) -> SynthWorld:
    """The default-size world for `seed` (cached)."""
    return SynthWorld(seed=seed)


@functools.lru_cache(maxsize=4)
def _tasks(seed: int) -> Dict[str, Dict[str, List[dict]]]:
    return build_tasks(get_world(seed))


def load_task(name: str, split: str, seed: int = 0) -> List[Example]:
    """The examples of task `name` and `split`, generated in memory (the default-size world)."""
    if name not in TASK_FORMATS:
        raise ConfigError(f"synthetic world: unknown task {name!r}; choose one of {', '.join(TASK_FORMATS)}")
    if split not in SPLITS:
        raise ConfigError(f"synthetic world: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    recs = _tasks(seed)[name][split]
    return [parse_record(json.loads(json.dumps(r)), TASK_FORMATS[name], f"synthworld {name}/{split}: record {i}")
            for i, r in enumerate(recs)]


def tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """`SynthWorld.tokenizer_corpus` of the default-size world."""
    return get_world(seed).tokenizer_corpus()


def train_tokenizer(out_path: Optional[os.PathLike | str], vocab_size: int = 2048, seed: int = 0):
    """Train the project tokenizer on `tokenizer_corpus(seed)`, labels as single-token symbols."""
    from ..tokenizer import Tokenizer

    world = get_world(seed)
    return Tokenizer.train(world.tokenizer_corpus(), out_path, vocab_size=vocab_size,
                           user_defined_symbols=world.tokenizer_symbols(), seed=seed)


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_world(out_dir: os.PathLike | str, seed: int = 0, **world_kwargs) -> Dict[str, Path]:
    """Write pretrain.jsonl, <task>/{train,validation,test}.json, dataset_info.json, world.json."""
    out = Path(out_dir)
    world = get_world(seed) if not world_kwargs else SynthWorld(seed=seed, **world_kwargs)
    tasks = build_tasks(world)
    written: Dict[str, Path] = {}
    path = out / "pretrain.jsonl"
    with atomic_write(path, "w") as f:
        for t in world.pretrain_texts():
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    written["pretrain"] = path
    for task in TASK_FORMATS:
        for split in SPLITS:
            path = out / task / f"{split}.json"
            with atomic_write(path, "w") as f:
                f.write(_dump(tasks[task][split]))
            written[f"{task}/{split}"] = path
    write_json(out / "dataset_info.json", dataset_info())
    write_json(out / "world.json", world.to_json())
    written["dataset_info"], written["world"] = out / "dataset_info.json", out / "world.json"
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftlab.data.synthworld", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the world's files into this folder")
    ap.add_argument("--tokenizer-out", help="train a tokenizer on the world and write it here")
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args(argv)
    if not args.out and not args.tokenizer_out:
        ap.error("give --out and/or --tokenizer-out")
    if args.out:
        files = write_world(args.out, seed=args.seed)
        print(f"wrote {len(files)} files to {args.out}")
    if args.tokenizer_out:
        tok = train_tokenizer(args.tokenizer_out, vocab_size=args.vocab_size, seed=args.seed)
        print(f"wrote {args.tokenizer_out}: vocab {tok.vocab_size}, "
              f"{Path(args.tokenizer_out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
