"""The synthetic world: determinism, facts in the corpus, held-out templates, disjoint splits, labels."""
import hashlib
import json
import re

import pytest

from peftlab.data.collate import encode_example, encode_prompt, reference_answer
from peftlab.data.formats import load_dataset
from peftlab.data.synthworld import (SPLITS, SynthWorld, exact_match, get_world, load_task, main,
                                     train_tokenizer, write_world)
from peftlab.data.world_tasks import TASK_FORMATS
from peftlab.data.world_templates import (HELD_OUT, HELD_OUT_QUESTIONS, PERSON_RELATIONS, PRETRAIN,
                                          QUESTIONS, SKILL_PRACTICE, cloze_prompt, fill, is_cloze)

PERSON_TASKS = ("cloze", "qa", "dialogue", "classify", "data2text")


@pytest.fixture(scope="module")
def world():
    return get_world(0)


@pytest.fixture(scope="module")
def corpus(world):
    return "\n".join(world.pretrain_texts())


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(None, vocab_size=2048)


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_world(a, seed=0)
    write_world(b, seed=0)
    write_world(c, seed=1)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    assert len(ha) == 1 + len(TASK_FORMATS) * len(SPLITS) + 2
    assert set(ha) == set(hc)
    for name in ("pretrain.jsonl", "world.json", "qa/test.json", "skills/train.json"):
        assert ha[name] != hc[name]
    # a fresh SynthWorld (no cache) gives the same corpus
    assert SynthWorld(seed=0).pretrain_texts() == get_world(0).pretrain_texts()
    # the written files are what load_task returns and what dataset_info announces
    info = json.loads((a / "dataset_info.json").read_text())
    for key, entry in info.items():
        data = load_dataset(a / entry["file_name"])
        if key == "synthworld_pretrain":
            assert data[0].is_text
            continue
        task, split = key[len("synthworld_"):].rsplit("_", 1)
        assert entry["formatting"] == TASK_FORMATS[task] == data.report.format
        assert data == load_task(task, split)


def test_names_unique_and_facts_consistent(world):
    people = world.people
    assert len(people) == 300 and len({p.name for p in people}) == 300
    names = ([p.name for p in people] + [c.name for c in world.cities] + [c.name for c in world.countries]
             + [o.name for o in world.orgs])
    assert len({n.casefold() for n in names}) == len(names)
    assert all(re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)?", n) for n in names)
    last = [p.name.split()[1] for p in people]
    places = {c.name for c in world.cities} | {c.name for c in world.countries}
    assert len(set(last)) == len(last) and not set(last) & places
    country_of = {c.name: c.country for c in world.cities}
    for p in people:
        assert p.nationality == country_of[p.birth_city] and p.friend != p.name
        assert p.friend in {q.name for q in people} and p.employer in {o.name for o in world.orgs}
    for c in world.countries:
        assert country_of[c.capital] == c.name
    words = world.skill_words
    assert all(3 <= len(w) <= 5 and w.isalpha() for w in words) and len(set(words)) == len(words)


def test_every_fact_in_every_pretraining_template_and_no_held_out_template(world, corpus):
    for p in world.people:
        for r in PERSON_RELATIONS:
            for t in PRETRAIN[r]:
                assert fill(t, p.name, p.fact(r)) in corpus, (p.name, r, t)
    for r in PERSON_RELATIONS:
        assert len(PRETRAIN[r]) + len(HELD_OUT[r]) >= 8 and len(HELD_OUT[r]) >= 2
        for t in HELD_OUT[r]:
            assert is_cloze(t) and t not in PRETRAIN[r]
            # the template's own wording never occurs in the corpus
            frags = [f.strip(" .'") for f in re.split(r"\{[so]\}", t)]
            longest = max(frags, key=len)
            assert len(longest) > 8 and longest not in corpus, t
    for c in world.cities:
        assert f"{c.name} is a city in {c.country}." in corpus
    for o in world.orgs:
        assert str(o.founded) in corpus and o.hq_city in corpus


def test_person_task_splits_disjoint_and_templates_held_out(world):
    split_people = {s: {p.name for p in ps} for s, ps in world.people_split.items()}
    assert sum(len(v) for v in split_people.values()) == 300
    assert not (split_people["train"] & split_people["test"]) and \
        not (split_people["train"] & split_people["validation"])
    for task in PERSON_TASKS:
        recs = {s: load_task(task, s) for s in SPLITS}
        for s in SPLITS:
            ents = {e.meta["entity"] for e in recs[s]}
            assert ents == split_people[s], (task, s)
        if task != "data2text":
            assert not any(e.meta["held_out"] for s in ("train", "validation") for e in recs[s])
            assert any(e.meta["held_out"] for e in recs["test"]) and \
                any(not e.meta["held_out"] for e in recs["test"])
        if task in ("cloze", "qa", "classify"):
            train_templates = {e.meta["template"] for e in recs["train"]}
            held = {e.meta["template"] for e in recs["test"] if e.meta["held_out"]}
            assert held and not held & train_templates, task
    for e in load_task("qa", "test"):
        q = e.meta["template"]
        assert (q == HELD_OUT_QUESTIONS[e.meta["relation"]]) == e.meta["held_out"]
        assert q in QUESTIONS[e.meta["relation"]] or e.meta["held_out"]


def test_task_answers_are_the_facts(world):
    by_name = {p.name: p for p in world.people}
    for e in load_task("cloze", "test") + load_task("qa", "validation"):
        p = by_name[e.meta["entity"]]
        assert reference_answer(e) == p.fact(e.meta["relation"])
    for e in load_task("cloze", "train"):
        t = e.meta["template"]
        assert e.messages[0].content == cloze_prompt(t, e.meta["entity"])
        assert fill(t, e.meta["entity"], reference_answer(e)) == f"{e.messages[0].content} {reference_answer(e)}."
    for e in load_task("dialogue", "test"):
        assert e.system and len(e.messages) == 6
        assert all(e.meta["entity"] in m.content for m in e.messages)
    for e in load_task("classify", "train"):
        assert reference_answer(e) == by_name[e.meta["entity"]].nationality
        assert all(lab in e.messages[0].content for lab in world.class_labels)
    for e in load_task("data2text", "test"):
        refs = e.meta["references"]
        assert reference_answer(e) == refs[0] and len(set(refs)) == len(refs) >= 2
        values = [line.split(": ", 1)[1] for line in e.messages[0].content.split("\n")[1:]]
        assert len(values) == len(e.meta["fields"]) and all(v in r for v in values for r in refs)


def test_skills_exact_and_disjoint(world, corpus):
    items = {}
    for s in SPLITS:
        items[s] = set()
        for e in load_task("skills", s):
            q, a = e.messages[0].content, reference_answer(e)
            kind, item = e.meta["skill"], e.meta["item"]
            if kind == "add":
                x, y = item
                assert re.findall(r"\d+", q) == [str(x), str(y)]
                assert a == str(x + y) and 10 <= x <= 99 and 10 <= y <= 99
                items[s].add((x, y))
            else:
                assert re.search(rf"\b{item}\b", q)
                assert a == (item[::-1] if kind == "reverse" else item.upper()) and a != item
                items[s].add(item)
    assert not items["train"] & items["test"] and not items["train"] & items["validation"]
    for x, y in (i for i in items["test"] if isinstance(i, tuple)):
        for t in SKILL_PRACTICE["add"]:
            assert t.format(a=x, b=y, c=x + y) not in corpus


def test_class_labels_are_single_tokens(world, tok):
    labels = world.class_labels
    assert 4 <= len(labels) <= 6
    for lab in labels:
        assert len(tok.encode(lab)) == 1, tok.tokenize(lab)
    for e in load_task("classify", "test"):
        f = encode_example(tok, e)
        trained = [t for t in f["labels"] if t != -100]
        assert len(trained) == 2 and trained[-1] == tok.eos_id  # label + eos
    # names split into few pieces
    lengths = [len(tok.encode(p.name)) for p in world.people]
    assert sorted(lengths)[len(lengths) // 2] <= 3


def test_every_task_encodes_and_answers_decode(tok):
    for task in TASK_FORMATS:
        for e in load_task(task, "test")[:20]:
            for template in ("default", "llama2", "plain"):
                f = encode_example(tok, e, template)
                prompt = encode_prompt(tok, e, template)
                answer = tok.decode(f["input_ids"][len(prompt):])
                assert answer == reference_answer(e).strip()


def test_cloze_probes_plain_text(world):
    probes = world.cloze_probes(world.people_split["test"], held_out=True)
    assert len(probes) == 60 * len(PERSON_RELATIONS) * 2
    for pr in probes[:50]:
        assert pr["template"] in HELD_OUT[pr["relation"]]
        assert fill(pr["template"], pr["entity"], pr["answer"]) == f"{pr['prompt']} {pr['answer']}."
    seen = world.cloze_probes(world.people[:2], held_out=False)
    assert all(not p["held_out"] and p["template"] in PRETRAIN[p["relation"]] for p in seen)


def test_exact_match_normalisation():
    assert exact_match(" Vendrath.", "vendrath")
    assert exact_match("VENDRATH!\n### User: more", "Vendrath")
    assert exact_match("Ilsa  Drom", "Ilsa Drom")
    assert not exact_match("Vendrath Bay", "Vendrath")
    assert not exact_match("85.0", "85")
    assert exact_match("plays the oboe.", ["plays the harp", "Plays the oboe"])
    assert not exact_match("", "x")


def test_cli_writes_world_and_tokenizer(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "w"), "--tokenizer-out", str(tmp_path / "t" / "tokenizer.model"),
                 "--vocab-size", "1024"]) == 0
    assert (tmp_path / "w" / "pretrain.jsonl").is_file()
    from peftlab.tokenizer import Tokenizer

    assert Tokenizer.load(tmp_path / "t").vocab_size == 1024
    with pytest.raises(SystemExit):
        main([])
