"""Virtual-token adapters against Hugging Face PEFT + transformers (test-only oracles), float32.

Both directions: an adapter saved here loads with `PeftModel.from_pretrained` on the
transformers model with the same base weights and gives the same logits, and an HF-saved
adapter with random weights loads here (folded) with the same logits.

Generation: with transformers 5.24 / peft 0.21.2, `PeftModel.generate` is not a usable oracle
for these methods (measured while writing this file): for prefix tuning the prefix cache is
ignored (its output equals the base model's), and for prompt tuning the virtual tokens are
injected again at every decoding step. So decoding is compared with greedy decoding by
repeated full forwards of HF's PeftModel, which is what `generate` is meant to compute.
"""
import json

import pytest
import torch

from peftlab.models import load_pretrained
from peftlab.tuners import get_peft_model
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.prompt import PromptTable

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_model_parity import _hf_model  # noqa: E402  (same tiny shapes: hidden 64, 2 layers, 4 heads)
from test_prompt_math import METHODS, N, left_pad  # noqa: E402

HF = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16,
                                                      encoder_reparameterization_type="LSTM"),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                              encoder_hidden_size=16),
    "deep_prompt": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
}
PREFIXES = ("prefix", "deep_prompt")


def hf_base():
    return _hf_model("llama", {"num_key_value_heads": 2})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    hf_base().save_pretrained(d)
    return d


def ours_base(base_dir):
    return load_pretrained(base_dir, dtype=torch.float32, load_tokenizer=False)[0].eval()


def saved_pair(method, base_dir, tmp_path, seed):
    """Our adapter on our base, and the same adapter file loaded by HF PEFT on the HF base."""
    torch.manual_seed(seed)
    ours = get_peft_model(ours_base(base_dir), METHODS[method]()).eval()
    save_adapter(ours, tmp_path)
    return ours, peft.PeftModel.from_pretrained(hf_base(), tmp_path).eval()


def hf_logits(model, ids, **kw):
    """HF returns logits for [virtual ; real] for input-side prompts; keep the real tokens'."""
    out = model(input_ids=ids, **kw).logits
    return out[:, -ids.shape[1]:]


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_saved_here_loads_in_hf_peft(method, base_dir, tmp_path):
    ours, hf = saved_pair(method, base_dir, tmp_path, 7)
    ids = torch.randint(3, 97, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_saved_adapter_loads_here_folded(method, base_dir, tmp_path):
    torch.manual_seed(8)
    hf = peft.get_peft_model(hf_base(), HF[method]())
    with torch.no_grad():  # random encoder weights everywhere (P-tuning, prefix MLP included)
        for p in hf.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.3 if method == "deep_prompt" else 0.5))
    hf.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(hf_base(), tmp_path).eval()
    ours = load_adapter(ours_base(base_dir), tmp_path).eval()
    assert isinstance(ours.prompt_encoder["default"], PromptTable)  # folded: only the output was saved
    width = 2 * 2 * 32 if method in PREFIXES else 64
    assert sum(p.numel() for p in ours.prompt_encoder.parameters()) == N * width
    ids = torch.randint(3, 97, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)
    # and back: what we write from it is what HF wrote
    save_adapter(ours, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    first = json.loads((tmp_path / "adapter_config.json").read_text())
    for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
              "num_transformer_submodules", "task_type"):
        assert again[k] == first[k], k


@pytest.mark.parametrize("method", ["prefix", "deep_prompt"])
def test_prefix_left_padded_batch_matches_hf_given_positions(method, base_dir, tmp_path):
    """HF takes positions from cache_position unless given; given positions it adds N, as we do."""
    ours, hf = saved_pair(method, base_dir, tmp_path, 9)
    ids, mask = left_pad([[5, 17, 33, 60, 2], [8, 9, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask)[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix", "deep_prompt"])
def test_greedy_generation_matches_hf_model(method, base_dir, tmp_path):
    ours, hf = saved_pair(method, base_dir, tmp_path, 10)
    ids = torch.randint(3, 97, (2, 7))
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, hf(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), seq[:, 7:])
