"""4-bit checkpoints: bitsandbytes-format files both ways with transformers, and bits per weight."""
import copy
import json

import pytest
import torch

from peftlab.errors import ConfigError
from peftlab.models import LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
from peftlab.quant.linear4bit import Linear4bit
from peftlab.quant.report import quantization_report

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

CFG = dict(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)


def _bnb_config(quant_type="nf4", dq=True):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)


def _dequantized(hf_model):
    """Replace each bitsandbytes Linear4bit by an fp32 nn.Linear holding dequantize_4bit(W) exactly."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    for name, mod in list(hf_model.named_modules()):
        if isinstance(mod, bnb.nn.Linear4bit):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent), child, lin)
    return hf_model


@pytest.fixture(scope="module")
def hf_full(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_full")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CFG)).save_pretrained(d)
    return d


@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False)])
def test_transformers_bnb_checkpoint_loads_with_same_logits(hf_full, tmp_path, quant_type, dq):
    hq = transformers.AutoModelForCausalLM.from_pretrained(hf_full, quantization_config=_bnb_config(quant_type, dq),
                                                           device_map="cpu", attn_implementation="eager")
    hq.save_pretrained(tmp_path)
    ours, _ = load_pretrained(tmp_path)
    assert isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    assert ours.model.layers[0].self_attn.q_proj.quant_state.quant_type == quant_type
    other = {"nf4": "fp4", "fp4": "nf4"}[quant_type]  # a stored 4-bit type cannot be re-chosen on load
    with pytest.raises(ConfigError, match=f"already quantized as {quant_type}; quantize='{other}'"):
        load_pretrained(tmp_path, quantize=other)
    ids = torch.randint(0, 97, (2, 7))
    # bitsandbytes' CPU forward is itself lossy (about 3e-3 off x @ dequant(W)^T) and repacks the
    # weights on first use, so the oracle is a copy of the transformers model, taken before any
    # forward, with every 4-bit layer replaced by its exact dequantization
    exact = _dequantized(copy.deepcopy(hq))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), exact(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), hq(input_ids=ids).logits, atol=2e-2, rtol=0)


def test_our_4bit_checkpoint_loads_in_transformers(hf_full, tmp_path):
    ours, _ = load_pretrained(hf_full, quantize="nf4")
    save_pretrained(ours, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_use_double_quant"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", attn_implementation="eager")
    again, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ref = ours(ids)
        torch.testing.assert_close(_dequantized(back)(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(again(ids), ref)


def test_quantize_on_load_matches_quantizing_the_full_model(hf_full):
    full, _ = load_pretrained(hf_full)
    q, _ = load_pretrained(hf_full, quantize="nf4")
    w = full.model.layers[0].mlp.up_proj.weight
    layer = q.model.layers[0].mlp.up_proj
    ref = Linear4bit.from_weight(w)
    assert torch.equal(layer.weight, ref.weight)
    assert torch.equal(layer.dequantize(), ref.dequantize())
    # embeddings, norms and head stay in the compute dtype
    assert q.lm_head.weight.dtype == torch.float32 and isinstance(q.lm_head, torch.nn.Linear)


def test_bits_per_weight_nf4_double_quant():
    cfg = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=4)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=0)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(model.model.layers[0].self_attn, name, Linear4bit.from_linear(getattr(model.model.layers[0].self_attn, name)))
    r = quantization_report(model)
    n = 4 * 512 * 512
    blocks = n // 4 // 64  # per layer
    per_layer_bits = 4 * (512 * 512) + 8 * blocks + 32 * -(-blocks // 256) + 32
    assert r["weights"] == n
    assert r["bits_per_weight"] == pytest.approx(4 * per_layer_bits / n, rel=1e-12)
    assert r["bits_per_weight"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4)  # 4.127
