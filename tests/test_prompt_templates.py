"""P-tuning templates (virtual tokens between anchors and input) and the prefix-vs-infix gradient fact.

Li & Liang 2021 (§7) find infixes ([x ; INFIX ; y]) weaker than prefixes. The structural reason,
checked exactly here: under causal attention the hidden state at position t is a function of
positions s <= t only, so a loss that reads only the input tokens' states before an infix gives
the infix a gradient of exactly zero (not small: zero), while a prefix, attended by every
position, gets a non-zero gradient from the same loss. Also true one level up for prefix
tuning: keys/values in every layer's cache are attended by every token.
"""
import pytest
import torch

from peftlab.errors import ConfigError, DataError
from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.tuners import get_peft_model
from peftlab.tuners.prefix import PrefixTuningConfig
from peftlab.tuners.prompt import PromptTuningConfig, PTuningConfig
from peftlab.tuners.ptuning import (collate_templates, encode_template, parse_template, place_virtual_tokens,
                                    template_embeddings)

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LAMA = "[P] [P] {subject} [P] is located in [P]"


class WordTokenizer:
    """Deterministic stand-in: one id per word (ids 10..), no bos/eos."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]


def model_with(config, seed=3):
    base = LlamaForCausalLM(LlamaConfig(**CFG)).reset_parameters(seed=seed)
    torch.manual_seed(seed)
    return get_peft_model(base, config)


def test_template_encoding_is_exact():
    tok = WordTokenizer()
    assert parse_template(LAMA) == [("P", ""), ("P", ""), ("field", "subject"), ("P", ""),
                                    ("text", "is located in"), ("P", "")]
    row = encode_template(LAMA, tok, {"subject": "Dante"}, 4, target="Florence", bos_id=1, eos_id=2)
    dante, is_, located, in_, florence = (tok.vocab[w] for w in ("Dante", "is", "located", "in", "Florence"))
    assert row["input_ids"] == [1, 0, 0, dante, 0, is_, located, in_, 0, florence, 2]
    assert row["prompt_slots"] == [-1, 0, 1, -1, 2, -1, -1, -1, 3, -1, -1]
    assert row["labels"] == [-100] * 9 + [florence, 2]
    with pytest.raises(ConfigError, match="3 \\[P\\] slots"):
        encode_template("[P] {subject} [P] [P]", tok, {"subject": "x"}, 4)
    with pytest.raises(DataError, match="example 7: field 'subject'"):
        encode_template(LAMA, tok, {"object": "x"}, 4, record="example 7")


def test_template_forward_places_the_virtual_tokens_and_batches_like_single_rows():
    tok = WordTokenizer()
    model = model_with(PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16)).eval()
    examples = [{"subject": "Dante"}, {"subject": "the old bridge of Ponte Vecchio"}]
    rows = [encode_template(LAMA, tok, ex, 4) for ex in examples]
    batch = collate_templates(rows, pad_id=0)
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 8  # left-padded
    with torch.no_grad():
        got = model(batch["input_ids"], attention_mask=batch["attention_mask"], prompt_slots=batch["prompt_slots"])
        assert got.shape == (2, 13, 97)  # template positions, nothing prepended
        # by hand: embed, overwrite slot positions with the encoder's output
        prompt = model.prompt()
        x = model.get_input_embeddings()(batch["input_ids"])
        for b, t in (batch["prompt_slots"] >= 0).nonzero().tolist():
            x[b, t] = prompt[batch["prompt_slots"][b, t]]
        ref = model.base_model(inputs_embeds=x, attention_mask=batch["attention_mask"])
        assert torch.equal(got, ref)
        emb, mask = template_embeddings(model, LAMA, tok, examples)
        assert torch.equal(emb, x) and torch.equal(mask, batch["attention_mask"])
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r["input_ids"]]), prompt_slots=torch.tensor([r["prompt_slots"]]))
            n = len(r["input_ids"])
            torch.testing.assert_close(got[i, -n:], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="prompt_slots must lie"):
        place_virtual_tokens(x, prompt, torch.full(x.shape[:2], 4))


def test_template_generation_equals_greedy_full_forwards():
    tok = WordTokenizer()
    model = model_with(PromptTuningConfig(num_virtual_tokens=4)).eval()
    rows = [encode_template(LAMA, tok, {"subject": s}, 4) for s in ("Dante", "a b c")]
    batch = collate_templates(rows, pad_id=0)
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                         prompt_slots=batch["prompt_slots"], max_new_tokens=5)
    ids, slots = torch.tensor([rows[0]["input_ids"]]), torch.tensor([rows[0]["prompt_slots"]])
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids, prompt_slots=slots)[:, -1].argmax(-1, keepdim=True)
            ids, slots = torch.cat([ids, nxt], 1), torch.cat([slots, torch.full_like(nxt, -1)], 1)
    assert torch.equal(out[0], ids[0, -5:])


def _prompt_grad_from_input_positions(template, model, tok):
    row = encode_template(template, tok, {"x": "a b c", "y": "d e"}, 2)
    ids, slots = torch.tensor([row["input_ids"]]), torch.tensor([row["prompt_slots"]])
    x_positions = [i for i, t in enumerate(row["input_ids"]) if t in [tok.vocab[w] for w in "a b c".split()]]
    model.zero_grad()
    hidden = model(ids, prompt_slots=slots, return_hidden=True)
    hidden[0, x_positions].pow(2).sum().backward()
    return model.prompt_encoder["default"].embedding.weight.grad


def test_infix_gets_exactly_zero_gradient_from_earlier_tokens_prefix_does_not():
    tok = WordTokenizer()
    model = model_with(PromptTuningConfig(num_virtual_tokens=2))
    infix = _prompt_grad_from_input_positions("{x} [P] [P] {y}", model, tok)
    assert torch.count_nonzero(infix) == 0
    prefix = _prompt_grad_from_input_positions("[P] [P] {x} {y}", model, tok)
    assert torch.count_nonzero(prefix) == prefix.numel() and float(prefix.abs().min()) > 0
    # prefix tuning (keys/values in every layer): every input token's state depends on it
    deep = model_with(PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=False))
    ids = torch.tensor([[tok.vocab[w] for w in "a b c".split()]])
    deep(ids, return_hidden=True).pow(2).sum().backward()
    assert torch.count_nonzero(deep.prompt_encoder["default"].embedding.weight.grad) > 0
