"""Freeze tuning and BitFit: which tensors train, errors, and their adapter files."""
import json

import pytest
import torch
from safetensors.torch import load_file

from peftlab.configs import from_dict
from peftlab.errors import AdapterError, ConfigError
from peftlab.models import LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
from peftlab.train.evaluate import token_loss_sum
from peftlab.tuners import get_peft_model, trainable_parameters_report
from peftlab.tuners.freeze import BitFitConfig, FreezeConfig, config_from_peft_dict
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.merge import merge_to_checkpoint

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny(seed=0, **extra):
    return LlamaForCausalLM(LlamaConfig(**TINY, **extra)).reset_parameters(seed=seed).eval()


def trained(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_of(model, prefix):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def sgd_steps(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        loss, n = token_loss_sum(model(x), x)
        (loss / n).backward()
        opt.step()
    return x


@pytest.mark.parametrize("config,prefixes", [
    (FreezeConfig(trainable_layers=2), ["model.layers.1.", "model.layers.2."]),
    (FreezeConfig(trainable_layers=-1), ["model.layers.0."]),
    (FreezeConfig(trainable_layers=1, trainable_modules=["mlp"]), ["model.layers.2.mlp."]),
    (FreezeConfig(trainable_layers=2, trainable_modules=["self_attn.q_proj", "input_layernorm"]),
     ["model.layers.1.self_attn.q_proj.", "model.layers.2.self_attn.q_proj.", "model.layers.1.input_layernorm.",
      "model.layers.2.input_layernorm."]),
    (FreezeConfig(trainable_layers=1, trainable_modules=["v_proj"], extra_modules=["model.norm", "lm_head"]),
     ["model.layers.2.self_attn.v_proj.", "model.norm.", "lm_head."]),
    (FreezeConfig(trainable_layers=0, extra_modules=["embed_tokens"]), ["model.embed_tokens."]),
])
def test_freeze_selects_exactly_these_tensors(config, prefixes):
    model = get_peft_model(tiny(), config)
    expected = set().union(*(params_of(model, p) for p in prefixes))
    assert expected and trained(model) == expected
    assert model.peft_config["default"] is config
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameters_report(model).startswith(f"trainable params: {n:,} ")


@pytest.mark.parametrize("kw,match", [
    (dict(trainable_layers=4), "4 but the model has 3"),
    (dict(trainable_layers=0), "nothing would train"),
    (dict(trainable_layers=1, trainable_modules=["feed_forward"]), "available: .*mlp.*self_attn"),
    (dict(trainable_layers=1, extra_modules=["final_norm"]), "final_norm"),
    (dict(trainable_layers=1, trainable_modules=[]), "trainable_modules"),
    (dict(trainable_layers=0, extra_modules="lm_head"), "'extra_modules' must be a list"),
])
def test_freeze_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        get_peft_model(tiny(), FreezeConfig(**kw))


def test_freeze_refuses_4bit_layers():
    from peftlab.quant.linear4bit import Linear4bit

    model = tiny()
    model.model.layers[2].mlp.up_proj = Linear4bit.from_linear(model.model.layers[2].mlp.up_proj)
    with pytest.raises(ConfigError, match="model.layers.2.mlp.up_proj.*4 bits"):
        get_peft_model(model, FreezeConfig(trainable_layers=1))


def test_freeze_config_from_yaml_dict_is_strict():
    assert from_dict(FreezeConfig, {"trainable_layers": -2, "trainable_modules": ["mlp"]}).trainable_layers == -2
    with pytest.raises(ConfigError, match="trainable_layer"):
        from_dict(FreezeConfig, {"trainable_layer": 2})


def test_bitfit_trains_only_biases():
    model = get_peft_model(tiny(attention_bias=True, mlp_bias=True), BitFitConfig())
    got = trained(model)
    assert got == {n for n, _ in model.named_parameters() if n.endswith(".bias")} and len(got) == 3 * 7
    model = get_peft_model(tiny(attention_bias=True, mlp_bias=True), BitFitConfig(bias_modules=["q_proj", "up_proj"]))
    assert trained(model) == {f"model.layers.{i}.{m}.bias" for i in range(3)
                              for m in ("self_attn.q_proj", "mlp.up_proj")}


def test_bitfit_without_biases_is_a_config_error():
    with pytest.raises(ConfigError, match="no bias parameters"):
        get_peft_model(tiny(), BitFitConfig())
    with pytest.raises(ConfigError, match="match no module with a bias.*q_proj"):
        get_peft_model(tiny(attention_bias=True), BitFitConfig(bias_modules=["gate_proj"]))


@pytest.mark.parametrize("config", [FreezeConfig(trainable_layers=1, trainable_modules=["mlp"], extra_modules=["lm_head"]),
                                    BitFitConfig()])
def test_adapter_files_roundtrip(config, tmp_path):
    base = tiny(attention_bias=True)
    model = get_peft_model(tiny(attention_bias=True), config)
    x = sgd_steps(model.train())
    model.eval()
    out = model(x)
    assert not torch.allclose(out, base(x))
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == config.peft_type
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == trained(model)  # the model's own parameter names, no PEFT prefix
    back = load_adapter(tiny(attention_bias=True), tmp_path)
    assert torch.equal(back(x), out)
    assert config_from_peft_dict(meta, "x") == config


def test_freeze_adapter_misfits(tmp_path):
    model = get_peft_model(tiny(), FreezeConfig(trainable_layers=1))
    save_adapter(model, tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 128})).reset_parameters(seed=0)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor 'model\.layers\.2\.mlp.*shape"):
        load_adapter(wider, tmp_path)
    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 4})).reset_parameters(seed=0)
    with pytest.raises(AdapterError, match="model.layers.2.*not trained by this FREEZE config"):
        load_adapter(deeper, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(ConfigError, match="x: unknown key"):
        config_from_peft_dict({**meta, "lora_alpha": 3}, "x")


def test_tied_head_extra_module_and_merge_to_checkpoint(tmp_path):
    save_pretrained(tiny(seed=1, tie_word_embeddings=True), tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base")
    model = get_peft_model(model, FreezeConfig(trainable_layers=0, extra_modules=["lm_head"]))
    assert trained(model) == {"model.embed_tokens.weight"}  # one shared tensor
    x = sgd_steps(model.train())
    out = model.eval()(x)
    save_adapter(model, tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {"lm_head.weight"}
    merge_to_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged")
    assert torch.equal(merged(x), out)
