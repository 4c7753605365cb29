"""Dataset formats (alpaca, sharegpt, openai, text), validation errors, collation and packing."""
import json
import warnings

import pytest
import torch

from peftlab.data.collate import (IGNORE_INDEX, Collator, TokenizedDataset, encode_example,
                                  encode_prompt, pack_examples, reference_answer)
from peftlab.data.formats import Example, Message, load_dataset
from peftlab.errors import DataError
from peftlab.tokenizer import encode_chat

ALPACA = [
    {"instruction": "Where was Ilsa born?", "input": "", "output": "Vendrath"},
    {"instruction": "Translate", "input": "kol vet", "output": "good day", "system": "Be brief.",
     "history": [["hi", "hello"]], "relation": "x"},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Find Ilsa."},
                       {"from": "function_call", "value": '{"name": "lookup"}'},
                       {"from": "observation", "value": "Kestren"},
                       {"from": "gpt", "value": "Ilsa lives in Kestren."}],
     "system": "Be brief.", "tools": [{"name": "lookup"}]},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                       {"from": "gpt", "value": "b"}]},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Find Ilsa."},
                  {"role": "assistant", "content": None, "tool_calls": [{"name": "lookup"}]},
                  {"role": "tool", "content": "Kestren"},
                  {"role": "assistant", "content": "Kestren."}],
     "tools": [{"name": "lookup"}]},
]


@pytest.fixture(scope="module")
def tok():
    from peftlab.data.synthworld import train_tokenizer

    return train_tokenizer(None, vocab_size=2048)


def _write(tmp_path, name, records, jsonl=None):
    path = tmp_path / name
    jsonl = name.endswith(".jsonl") if jsonl is None else jsonl
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_alpaca(tmp_path, ext):
    data = load_dataset(_write(tmp_path, f"a.{ext}", ALPACA))
    assert data.report.format == "alpaca" and data.report.n_loaded == 2
    assert data[0].messages == [Message("user", "Where was Ilsa born?"), Message("assistant", "Vendrath")]
    assert data[0].system is None
    ex = data[1]
    assert [m.role for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[2].content == "Translate\nkol vet"
    assert ex.system == "Be brief." and ex.meta == {"relation": "x"}


def test_sharegpt_and_openai(tmp_path):
    data = load_dataset(_write(tmp_path, "s.json", SHAREGPT))
    assert data.report.format == "sharegpt"
    assert [m.role for m in data[0].messages] == ["user", "function_call", "observation", "assistant"]
    assert json.loads(data[0].tools) == [{"name": "lookup"}]
    assert data[1].system == "S" and len(data[1].messages) == 2
    data = load_dataset(_write(tmp_path, "o.jsonl", OPENAI))
    assert data.report.format == "openai"
    ex = data[0]
    assert ex.system == "S"
    assert [m.role for m in ex.messages] == ["user", "function_call", "observation", "assistant"]
    assert json.loads(ex.messages[1].content) == [{"name": "lookup"}]
    # ShareGPT-style turns stored under "messages"
    data = load_dataset(_write(tmp_path, "sm.json", [{"messages": SHAREGPT[1]["conversations"]}]))
    assert data[0].system == "S" and data[0].messages[1] == Message("assistant", "b")


def test_text_and_jsonl_in_json_file(tmp_path):
    recs = [{"text": "Vendrath lies in Valdoria."}, {"text": "Kestren too."}]
    for name, jsonl in (("t.jsonl", True), ("t.json", True), ("t2.json", False)):
        data = load_dataset(_write(tmp_path, name, recs, jsonl=jsonl))
        assert [e.text for e in data] == [r["text"] for r in recs] and data[0].is_text
    with pytest.raises(DataError, match="record 0"):
        load_dataset(_write(tmp_path, "x.json", recs), format="alpaca")


BAD = [
    ("alpaca", {"instruction": "q"}, "'output'.*missing"),
    ("alpaca", {"instruction": "q", "output": 3}, "'output'.*expected a string"),
    ("alpaca", {"instruction": "q", "output": "  "}, "'output'.*empty answer"),
    ("alpaca", {"instruction": "", "output": "a"}, "'instruction'.*empty"),
    ("alpaca", {"instruction": "q", "output": "a", "history": "hi"}, "'history'"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u"]]}, r"'history\[0\]'"),
    ("alpaca", {"instruction": "q", "output": "a", "history": [["u", ""]]}, r"'history\[0\]\[1\]'.*empty answer"),
    ("alpaca", {"instruction": "q", "output": "a", "system": ["s"]}, "'system'"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "a"}]}, r"'conversations\[0\]'.*out of order"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     r"'conversations\[1\]'.*out of order"),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                    {"from": "observation", "value": "b"}]}, r"'conversations\[2\]'.*position 2"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     r"'conversations\[1\].from'.*unknown role"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, r"'conversations\[0\].value'.*missing"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     r"'conversations\[1\]'.*empty answer"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                    {"from": "human", "value": "c"}]}, r"'conversations\[2\]'.*must end"),
    ("sharegpt", {"conversations": "hello"}, "'conversations'.*expected a list"),
    ("sharegpt", {"conversations": []}, "'conversations'.*empty"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                  "tools": 5}, "'tools'"),
    ("openai", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]},
     r"'messages\[1\].role'.*only allowed first"),
    ("openai", {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "s"}]},
     r"'messages\[1\].role'.*unknown role"),
    ("openai", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     r"'messages\[1\].content'.*missing"),
    ("openai", {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
     r"'messages\[1\]'.*out of order"),
    ("text", {"text": ""}, "'text'.*empty"),
    ("text", {"text": ["a"]}, "'text'.*expected a string"),
]


@pytest.mark.parametrize("fmt,bad,pattern", BAD)
@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_malformed_record_names_file_record_field(tmp_path, fmt, bad, pattern, ext):
    good = {"alpaca": ALPACA[0], "sharegpt": SHAREGPT[1], "openai": OPENAI[0], "text": {"text": "t"}}[fmt]
    path = _write(tmp_path, f"data_{fmt}.{ext}", [good, good, bad])
    where = r"record 2 \(line 3\)" if ext == "jsonl" else r"record 2(?! \(line)"
    with pytest.raises(DataError, match=rf"data_{fmt}\.{ext}: {where}: field {pattern}"):
        load_dataset(path)
    with pytest.raises(DataError, match="record 2"):
        load_dataset(path, format=fmt)


@pytest.mark.parametrize("content,name,pattern", [
    ("", "e.json", "e.json: empty file"),
    ("  \n", "e.jsonl", "e.jsonl: empty file"),
    ("[]", "l.json", "l.json: no records"),
    ('{"instruction": "q", "output": "a"}', "o.json", "o.json: expected a JSON list"),
    ('[{"instruction": "q", "output": "a"},', "t.json", "t.json: invalid JSON at line 1"),
    ('{"text": "a"}\n\n{"text": \n', "j.jsonl", r"j.jsonl: record 1 \(line 3\): invalid JSON"),
    ('[["q", "a"]]', "n.json", "n.json: record 0: cannot detect the format"),
    ('[{"prompt": "q"}]', "k.json", r"k.json: record 0: cannot detect the format from keys \['prompt'\]"),
    ('[{"text": "a"}, 7]', "m.json", "m.json: record 1: expected a JSON object"),
])
def test_file_level_errors(tmp_path, content, name, pattern):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_dataset(path)


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataError, match="nothere.json: dataset file not found"):
        load_dataset(tmp_path / "nothere.json")
    with pytest.raises(DataError, match="unknown format"):
        load_dataset(_write(tmp_path, "a.json", ALPACA), format="csv")


def test_skip_invalid_counts_and_warns(tmp_path):
    bad = [{"instruction": "q"}, {"instruction": "q", "output": ""}, "nope"] * 3
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in [ALPACA[0]] + bad + [ALPACA[1]]]
    lines.insert(2, "{broken")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"mixed.jsonl: 2 of 12 records loaded as alpaca, 10 invalid skipped"):
        data = load_dataset(path, skip_invalid=True)
    assert len(data) == 2 and data[1].system == "Be brief."
    r = data.report
    assert (r.n_records, r.n_loaded, r.n_skipped) == (12, 2, 10)
    assert len(r.reasons) == 5
    assert "record 1 (line 2): field 'output': missing" in r.reasons[0]
    assert "record 2 (line 3): invalid JSON" in r.reasons[1]
    with pytest.raises(DataError, match="record 1"):
        load_dataset(path)
    only_bad = _write(tmp_path, "bad.json", bad)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no valid records"):
        load_dataset(only_bad, format="alpaca", skip_invalid=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file warns nothing
        load_dataset(_write(tmp_path, "ok.json", ALPACA), skip_invalid=True)


# ----------------------------------------------------------------------------- collation
def _chat(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    return Example(messages=[Message(r, c) for r, c in zip(roles, turns)], system=system)


def test_encode_example_labels_follow_loss_mask(tok):
    ex = _chat("Where was Ilsa born?", "Vendrath", "And Kestren?", "Valdoria", system="Be brief.")
    for template in ("default", "llama2", "plain"):
        f = encode_example(tok, ex, template)
        ids, mask = encode_chat(tok, ex.messages, system=ex.system, template=template)
        assert f["input_ids"] == ids
        assert f["labels"] == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        prompt = encode_prompt(tok, ex, template)
        assert f["input_ids"][:len(prompt)] == prompt
        # inside the prompt only the first answer and its eos are trained
        assert [t for t in f["labels"][:len(prompt)] if t != IGNORE_INDEX] == \
            tok.encode("Vendrath") + [tok.eos_id]
        assert f["labels"][len(prompt):] == f["input_ids"][len(prompt):]
        assert tok.decode(f["input_ids"][len(prompt):]) == "Valdoria"
    assert reference_answer(ex) == "Valdoria"


def test_encode_example_text_and_truncation(tok):
    ex = Example(text="Vendrath lies in Valdoria.")
    f = encode_example(tok, ex)
    assert f["input_ids"] == tok.encode(ex.text, bos=True, eos=True) == f["labels"]
    right = encode_example(tok, ex, max_length=3, truncation="right")
    left = encode_example(tok, ex, max_length=3, truncation="left")
    assert right["input_ids"] == f["input_ids"][:3] and left["input_ids"] == f["input_ids"][-3:]
    assert left["labels"] == f["labels"][-3:]
    chat = _chat("Where was Ilsa born? " * 5, "Vendrath")
    full = encode_example(tok, chat)
    kept = encode_example(tok, chat, max_length=6, truncation="left")
    assert kept["labels"][-1] == tok.eos_id and kept["input_ids"] == full["input_ids"][-6:]
    with pytest.raises(DataError, match="truncation"):
        encode_example(tok, ex, truncation="middle")
    with pytest.raises(DataError, match="plain text"):
        encode_prompt(tok, ex)
    with pytest.raises(DataError, match="not an assistant"):
        reference_answer(Example(messages=[Message("user", "q")]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_padding(side):
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9]}]
    batch = Collator(pad_id=3, padding_side=side, pad_to_multiple_of=4)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (2, 4) for v in batch.values())
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [9, 3, 3, 3]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7, -100], [9, -100, -100, -100]]
    else:
        assert batch["input_ids"].tolist() == [[3, 5, 6, 7], [3, 3, 3, 9]]
        assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
        assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 9]]
    assert Collator(0)(feats)["input_ids"].shape == (2, 3)
    with pytest.raises(DataError, match="feature 0"):
        Collator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(DataError, match="padding_side"):
        Collator(0, padding_side="top")


def test_packing_keeps_every_token():
    enc = [{"input_ids": [1, 10, 11, 2], "labels": [1, 10, 11, 2]},
           {"input_ids": [1, 20, 2], "labels": [-100, 20, 2]},
           {"input_ids": [1, 30, 31, 32, 33, 2], "labels": [1, 30, 31, 32, 33, 2]}]
    packed = pack_examples(enc, 4)
    assert [len(p["input_ids"]) for p in packed] == [4, 4, 4, 1]
    assert sum((p["input_ids"] for p in packed), []) == sum((e["input_ids"] for e in enc), [])
    assert sum((p["labels"] for p in packed), []) == sum((e["labels"] for e in enc), [])
    with pytest.raises(DataError):
        pack_examples(enc, 0)


def test_dataset_with_dataloader(tok):
    examples = [_chat("Where was Ilsa born?", "Vendrath"), Example(text="Kestren lies in Valdoria."),
                _chat("And Kestren?", "Valdoria")]
    ds = TokenizedDataset.from_examples(tok, examples)
    assert len(ds) == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=Collator(tok.pad_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 3
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in ds.features)
    packed = TokenizedDataset.from_examples(tok, examples, pack_to=8)
    assert all(len(f["input_ids"]) == 8 for f in packed.features[:-1])
    with pytest.warns(UserWarning, match="1 of 1 examples have no trained token"):
        TokenizedDataset.from_examples(tok, examples[:1], max_length=2, truncation="right")
