"""Tokenizer: training determinism, load/save, errors, and chat-template loss masks token by token."""
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftlab.errors import CheckpointError, ConfigError, DataError
from peftlab.tokenizer import Tokenizer, encode_chat

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Vendrath is a city in Valdoria. Kestren lies in Moravin.",
    "### User: Where was Ilsa Drom born?\n### Assistant: Vendrath",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 12 + 30? [/INST] 42",
    "Tools: lookup(name) returns facts. Observation: found 3 results.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, None, vocab_size=400, user_defined_symbols=["\u2581Valdoria"])


def _llama_style(tmp_path):
    """A tokenizer.model laid out as Llama's: unk=0, bos=1, eos=2 and no pad piece."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=380,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_train_is_deterministic_and_reserves_specials(tmp_path):
    a = Tokenizer.train(CORPUS, tmp_path / "a.model", vocab_size=400, seed=3)
    b = Tokenizer.train(iter(CORPUS), tmp_path / "b.model", vocab_size=400, seed=3)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.model_proto() == b.model_proto()
    assert (a.unk_id, a.bos_id, a.eos_id, a.pad_id) == (0, 1, 2, 3)
    assert [a.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert a.vocab_size == len(a) == 400


def test_train_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(["tiny"], None, vocab_size=100_000)
    with pytest.raises(DataError, match="text 1"):
        Tokenizer.train(["ok", 3], None, vocab_size=300)
    with pytest.raises(ConfigError, match="model_type"):
        Tokenizer.train(CORPUS, None, vocab_size=300, model_type="word")


def test_save_load_roundtrip(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    assert path.name == "tokenizer.model"
    for src in (tmp_path / "tk", path):
        t2 = Tokenizer.load(src)
        assert t2.model_proto() == tok.model_proto()
        assert t2.encode("Vendrath lies in Valdoria.") == tok.encode("Vendrath lies in Valdoria.")


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(CheckpointError, match="nope.*not found"):
        Tokenizer.load(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(CheckpointError, match="bad.model"):
        Tokenizer.load(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.model.*empty"):
        Tokenizer.load(empty)


def test_llama_style_file_pad_falls_back_to_unk(tmp_path):
    t = Tokenizer.load(_llama_style(tmp_path))
    assert (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2)
    assert t.sp.pad_id() == -1 and t.pad_id == 0
    ids, mask = encode_chat(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox"}])
    assert ids[0] == 1 and ids[-1] == 2 and mask[-1] and not mask[0]


def test_encode_options_digits_bytes_and_decode(tok):
    ids = tok.encode("2024")
    assert [tok.id_to_piece(i) for i in ids if tok.id_to_piece(i) != "\u2581"] == ["2", "0", "2", "4"]
    assert tok.encode("dog", bos=True, eos=True)[0] == tok.bos_id
    assert tok.encode("dog", bos=True, eos=True)[-1] == tok.eos_id
    assert tok.encode("") == []
    assert tok.encode("in Valdoria") == tok.encode("in") + [tok.piece_to_id("\u2581Valdoria")]
    framed = tok.encode("the fox", bos=True, eos=True)
    assert tok.decode(framed) == "the fox"
    assert tok.decode(framed, skip_special=False) == "<s>the fox</s>"
    assert tok.decode([tok.pad_id] + tok.encode("dog")) == "dog"
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(DataError):
        tok.encode(b"bytes")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_roundtrips_through_byte_fallback(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------------ chat templates
def _enc(tok, s):
    return tok.encode(s)


def _check(ids, mask, segments):
    """segments: list of (ids, trained); compare token by token."""
    exp_ids = [t for seg, _ in segments for t in seg]
    exp_mask = [m for seg, m in segments for _ in seg]
    assert ids == exp_ids
    assert mask == exp_mask


def test_default_template_multi_turn_token_by_token(tok):
    B, E = [tok.bos_id], [tok.eos_id]
    msgs = [{"role": "user", "content": "Where was Ilsa Drom born?"},
            {"role": "assistant", "content": "Vendrath"},
            {"role": "user", "content": "And Kestren?"},
            {"role": "assistant", "content": "In Valdoria."}]
    ids, mask = encode_chat(tok, msgs, system="Be brief.")
    _check(ids, mask, [
        (B, False),
        (_enc(tok, "Be brief.\n### User: Where was Ilsa Drom born?\n### Assistant:"), False),
        (_enc(tok, "Vendrath") + E, True),
        (_enc(tok, "### User: And Kestren?\n### Assistant:"), False),
        (_enc(tok, "In Valdoria.") + E, True),
    ])
    assert tok.decode(ids, skip_special=False) == (
        "<s>Be brief.\n### User: Where was Ilsa Drom born?\n### Assistant: Vendrath</s>"
        "### User: And Kestren?\n### Assistant: In Valdoria.</s>")
    # exactly the answers and their eos are trained
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == _enc(tok, "Vendrath") + E + _enc(tok, "In Valdoria.") + E


def test_default_template_no_system_and_generation_prompt(tok):
    msgs = [{"role": "user", "content": "Where was Ilsa Drom born?"}]
    ids, mask = encode_chat(tok, msgs, add_generation_prompt=True)
    assert ids == [tok.bos_id] + _enc(tok, "### User: Where was Ilsa Drom born?\n### Assistant:")
    assert not any(mask)
    ids2, _ = encode_chat(tok, msgs, add_generation_prompt=False)
    assert ids2 == [tok.bos_id] + _enc(tok, "### User: Where was Ilsa Drom born?")
    full, fmask = encode_chat(tok, msgs + [{"role": "assistant", "content": "Vendrath"}])
    assert full[:len(ids)] == ids and fmask[len(ids):] == [True] * (len(full) - len(ids))


def test_tools_observation_function_call_token_by_token(tok):
    B, E = [tok.bos_id], [tok.eos_id]
    msgs = [{"role": "user", "content": "Find Ilsa."},
            {"role": "function_call", "content": '{"name": "lookup", "arguments": {"q": "Ilsa"}}'},
            {"role": "observation", "content": "found 3 results"},
            {"role": "assistant", "content": "Ilsa lives in Kestren."}]
    ids, mask = encode_chat(tok, msgs, system="Be brief.", tools="lookup(name)")
    _check(ids, mask, [
        (B, False),
        (_enc(tok, "Be brief.\nTools: lookup(name)\n### User: Find Ilsa.\n### Assistant:"), False),
        (_enc(tok, '{"name": "lookup", "arguments": {"q": "Ilsa"}}') + E, True),
        (_enc(tok, "### Observation: found 3 results\n### Assistant:"), False),
        (_enc(tok, "Ilsa lives in Kestren.") + E, True),
    ])
    # tools without a system prompt
    ids, _ = encode_chat(tok, msgs[:2], tools="lookup(name)")
    assert ids[:1 + len(_enc(tok, "Tools: lookup(name)\n### User: Find Ilsa.\n### Assistant:"))] == \
        B + _enc(tok, "Tools: lookup(name)\n### User: Find Ilsa.\n### Assistant:")


def test_llama2_template_token_by_token(tok):
    B, E = [tok.bos_id], [tok.eos_id]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Where was Ilsa Drom born? "},
            {"role": "assistant", "content": "Vendrath "},
            {"role": "user", "content": "And Kestren?"},
            {"role": "assistant", "content": "In Valdoria."},
            {"role": "observation", "content": "ok"}]
    ids, mask = encode_chat(tok, msgs, template="llama2", add_generation_prompt=True)
    _check(ids, mask, [
        (B + _enc(tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere was Ilsa Drom born? [/INST]"), False),
        (_enc(tok, "Vendrath") + E, True),
        (B + _enc(tok, "[INST] And Kestren? [/INST]"), False),
        (_enc(tok, "In Valdoria.") + E, True),
        (B + _enc(tok, "[INST] ok [/INST]"), False),
    ])
    assert tok.decode(ids, skip_special=False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere was Ilsa Drom born? [/INST] Vendrath</s>"
        "<s>[INST] And Kestren? [/INST] In Valdoria.</s><s>[INST] ok [/INST]")
    # no system: no <<SYS>> block
    ids, _ = encode_chat(tok, msgs[1:3], template="llama2")
    assert ids[:1 + len(_enc(tok, "[INST] Where was Ilsa Drom born? [/INST]"))] == \
        B + _enc(tok, "[INST] Where was Ilsa Drom born? [/INST]")


def test_plain_template_token_by_token(tok):
    B, E = [tok.bos_id], [tok.eos_id]
    msgs = [{"role": "user", "content": "Ilsa Drom was born in"}, {"role": "assistant", "content": "Vendrath"}]
    ids, mask = encode_chat(tok, msgs, template="plain")
    _check(ids, mask, [(B + _enc(tok, "Ilsa Drom was born in"), False), (_enc(tok, "Vendrath") + E, True)])
    # the answer is tokenized as it is in running text
    assert ids[1:-1] == _enc(tok, "Ilsa Drom was born in Vendrath")


def test_message_objects_and_order_errors(tok):
    from peftlab.data.formats import Message

    ids, mask = encode_chat(tok, [Message("user", "hi"), Message("assistant", "fox")])
    assert sum(mask) == len(_enc(tok, "fox")) + 1
    with pytest.raises(DataError, match=r"messages\[0\].role"):
        encode_chat(tok, [{"role": "assistant", "content": "x"}])
    with pytest.raises(DataError, match=r"messages\[2\].role"):
        encode_chat(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                          {"role": "user", "content": "b"}])
    with pytest.raises(DataError, match="add_generation_prompt"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    add_generation_prompt=True)
    with pytest.raises(DataError, match="both"):
        encode_chat(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], system="t")
    with pytest.raises(DataError, match=r"messages\[0\].content"):
        encode_chat(tok, [{"role": "user", "content": 5}])
    with pytest.raises(ConfigError, match="unknown chat template"):
        encode_chat(tok, [{"role": "user", "content": "a"}], template="chatml")
