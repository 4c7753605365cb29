"""LoRA behaviour: targets, configs from PEFT files, freezing, adapters, merging, QLoRA, LoRA+, files."""
import json

import pytest
import torch
import torch.nn as nn

from peftlab.configs import from_dict
from peftlab.errors import AdapterError, ConfigError
from peftlab.models import LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
from peftlab.tuners import get_peft_model, trainable_parameters_report
from peftlab.tuners import lora as L
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.lora import LoraConfig, config_from_peft_dict
from peftlab.tuners.lora_layers import LoraEmbedding, LoraLinear, ModulesToSave
from peftlab.tuners.merge import merge_to_checkpoint

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny(seed=0, **extra):
    return LlamaForCausalLM(LlamaConfig(**TINY, **extra)).reset_parameters(seed=seed).eval()


def ids(seed=0):
    return torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(seed))


def wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding)))


def perturb(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * std)


# --- targets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,expected", [
    (dict(target_modules=["q_proj"]), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (dict(target_modules=["model.layers.1.mlp.up_proj"]), ["model.layers.1.mlp.up_proj"]),
    (dict(target_modules=r"model\.layers\.0\.self_attn\.(k|v)_proj"),
     ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
     ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    (dict(target_modules=["down_proj"], layers_to_transform=[0], layers_pattern="layers"),
     ["model.layers.0.mlp.down_proj"]),
    (dict(target_modules=None), [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]),
])
def test_target_matching(kw, expected):
    model = get_peft_model(tiny(), LoraConfig(r=2, **kw))
    assert wrapped(model) == sorted(expected)


def test_all_linear_skips_the_head_and_respects_exclude_modules():
    model = get_peft_model(tiny(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj"]))
    names = wrapped(model)
    assert len(names) == 2 * 6 and not any("lm_head" in n or "o_proj" in n for n in names)
    assert model.peft_config["default"].target_modules == names  # spelled out, as PEFT saves it


def test_target_matching_nothing_lists_available_modules():
    with pytest.raises(ConfigError, match="available: .*down_proj.*q_proj"):
        get_peft_model(tiny(), LoraConfig(target_modules=["qkv_proj"]))
    with pytest.raises(ConfigError, match="Mlp|MLP"):
        get_peft_model(tiny(), LoraConfig(target_modules=["mlp"]))


# --- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: LoraConfig(fan_in_fan_out=True), "fan_in_fan_out"),
    (lambda: from_dict(LoraConfig, {"r": 8, "lora_plus_lr_ratio": 16}), "lora_plus_lr_ratio"),
    (lambda: LoraConfig(init_lora_weights="olora"), "init_lora_weights"),
    (lambda: LoraConfig(bias="some"), "bias"),
    (lambda: LoraConfig(r=0), "'r'"),
    (lambda: LoraConfig(target_modules="q_proj(", r=2), "regex"),
    (lambda: LoraConfig(target_modules=["q_proj"], layers_to_transform="0"), "layers_to_transform"),
    (lambda: LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, -1]), "layers_to_transform"),
    (lambda: LoraConfig(target_modules=["q_proj"], layers_pattern=3), "layers_pattern"),
    (lambda: LoraConfig(lora_dropout="0.1"), "lora_dropout"),
])
def test_config_validation(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_derived_values():
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=8).scaling == 0.5
    assert LoraConfig(init_lora_weights="pissa_niter_7").pissa_niter == 7


PEFT_DICT = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "revision": None,
             "inference_mode": True, "auto_mapping": None, "megatron_config": None, "megatron_core": "megatron.core",
             "loftq_config": {}, "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {},
             "peft_version": "0.21.2", "use_qalora": False, "qalora_group_size": 16, "lora_bias": False,
             "task_type": "CAUSAL_LM", "init_lora_weights": True, "eva_config": None, "target_parameters": None,
             "some_future_switch": None}


def test_config_from_peft_dict_ignores_harmless_and_refuses_unimplemented():
    cfg = config_from_peft_dict(dict(PEFT_DICT), "x/adapter_config.json")
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (4, 16, ["q_proj"])
    for key, value in [("rank_pattern", {"q_proj": 8}), ("use_qalora", True), ("layer_replication", [[0, 1]]),
                       ("alpha_pattern", {"v_proj": 2}), ("lora_bias", True), ("some_future_switch", 3),
                       ("init_lora_weights", "loftq"), ("task_type", "SEQ_CLS"), ("fan_in_fan_out", True)]:
        with pytest.raises(ConfigError, match=f"x/adapter_config.json.*{key}"):
            config_from_peft_dict({**PEFT_DICT, key: value}, "x/adapter_config.json")


def test_config_round_trips_through_peft_dict():
    cfg = LoraConfig(r=4, lora_alpha=8.5, target_modules=r".*q_proj", use_dora=True, bias="lora_only",
                     modules_to_save=["lm_head"], init_lora_weights="gaussian", lora_dropout=0.1)
    back = config_from_peft_dict(json.loads(json.dumps(cfg.to_peft_dict())))
    assert back == cfg


# --- freezing and the parameter report ------------------------------------------------------------
def test_only_adapters_train_and_report_counts_them():
    model = tiny()
    n_base = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (96 + 64))
    assert trainable_parameters_report(model) == (
        f"trainable params: {expected:,} || all params: {n_base + expected:,} || "
        f"trainable%: {100 * expected / (n_base + expected):.4f}")


@pytest.mark.parametrize("bias,expected", [
    ("all", {"model.layers.0.self_attn.q_proj.base_layer.bias", "model.layers.0.self_attn.k_proj.bias",
             "model.layers.0.mlp.up_proj.bias"}),
    ("lora_only", {"model.layers.0.self_attn.q_proj.base_layer.bias"}),
])
def test_bias_modes(bias, expected):
    model = get_peft_model(tiny(attention_bias=True, mlp_bias=True), LoraConfig(r=2, target_modules=["q_proj"], bias=bias))
    trained_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert expected <= trained_biases
    assert len(trained_biases) == (2 * 7 if bias == "all" else 2)
    with pytest.raises(ConfigError, match="no bias"):
        get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"], bias=bias))


def test_modules_to_save_trains_a_copy_and_keeps_the_original():
    base = tiny()
    head = base.lm_head
    w0 = head.weight.detach().clone()
    x = ids()
    ref = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave) and model.lm_head.original_module is head
    assert model.lm_head.modules_to_save["default"].weight.requires_grad and not head.weight.requires_grad
    perturb(model)
    assert not torch.allclose(model(x), ref)
    with L.disable_adapters(model):
        assert torch.equal(model(x), ref)
    L.unload(model)
    assert model.lm_head is head and torch.equal(head.weight, w0) and torch.equal(model(x), ref)
    assert not hasattr(model, "peft_config")


# --- several adapters ---------------------------------------------------------------------------
def test_named_adapters_add_set_delete():
    base = tiny()
    x = ids()
    ref = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model, seed=1)
    out_a = model(x)
    L.add_adapter(model, "b", LoraConfig(r=3, target_modules=["v_proj", "q_proj"]))
    assert model.active_adapter == "default" and torch.equal(model(x), out_a)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    L.set_adapter(model, "b")
    perturb(model, seed=2)
    out_b = model(x)
    assert not torch.allclose(out_b, out_a)
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    L.set_adapter(model, ["default", "b"])
    out_ab = model(x)
    with L.disable_adapters(model):
        assert torch.equal(model(x), ref)
    assert torch.equal(model(x), out_ab)
    with pytest.raises(AdapterError, match="no adapter named"):
        L.set_adapter(model, "c")
    L.delete_adapter(model, "default")
    assert model.active_adapter == "b" and torch.equal(model(x), out_b)
    L.delete_adapter(model, "b")
    assert wrapped(model) == [] and not hasattr(model, "peft_config") and torch.equal(model(x), ref)


def test_set_adapter_while_merged_never_runs_a_stale_merge():
    model = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    L.add_adapter(model, "b", LoraConfig(r=3, target_modules=["q_proj"], use_dora=True))
    L.set_adapter(model, ["default", "b"])
    perturb(model)
    x = ids()
    both = model(x)
    L.set_adapter(model, "default")
    only_a = model(x)
    L.set_adapter(model, ["default", "b"])
    L.merge_adapter(model)
    L.set_adapter(model, ["b", "default"])              # the same set: stays merged
    q = model.model.layers[0].self_attn.q_proj
    assert sorted(q.merged_adapters) == ["b", "default"]
    torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
    L.set_adapter(model, "default")                     # b must leave the weights
    assert not q.merged_adapters                        # (v_proj, without b, stays merged)
    torch.testing.assert_close(model(x), only_a, atol=1e-5, rtol=1e-5)
    q.merge(["b"])                                      # merged but not active: refused, not wrong
    with pytest.raises(AdapterError, match=r"\['b'\] are merged into the weight but not active"):
        model(x)


def test_embedding_lora_on_a_bfloat16_base_keeps_the_hidden_dtype():
    model = get_peft_model(tiny().to(torch.bfloat16), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                                  init_lora_weights=False))
    emb = model.model.embed_tokens
    assert emb.lora_embedding_A["default"].dtype == torch.float32   # adapters stay float32
    assert emb(ids()).dtype == torch.bfloat16
    logits = model(ids())
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert emb.lora_embedding_A["default"].grad.abs().sum() > 0


# --- merging ----------------------------------------------------------------------------------------
def test_safe_merge_refuses_non_finite_weights():
    model = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    q = model.model.layers[1].self_attn.q_proj
    w0 = q.base_layer.weight.detach().clone()
    with torch.no_grad():
        q.lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(AdapterError, match="model.layers.1.self_attn.q_proj.*non-finite"):
        L.merge_adapter(model, safe_merge=True)
    assert torch.equal(q.base_layer.weight, w0) and not q.merged_adapters


def test_merge_and_unload_gives_a_plain_model_with_the_same_output():
    model = get_peft_model(tiny(tie_word_embeddings=True),
                           LoraConfig(r=4, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"]))
    perturb(model)
    x = ids()
    out = model(x)
    plain = L.merge_and_unload(model)
    assert wrapped(plain) == [] and isinstance(plain.lm_head, nn.Linear) and not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)
    assert plain.config.tie_word_embeddings is False  # the trained head copy no longer equals the embeddings


def test_merging_into_a_tied_weight_is_refused():
    model = get_peft_model(tiny(tie_word_embeddings=True), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(AdapterError, match="tied"):
        L.merge_adapter(model)


def test_merge_to_checkpoint(tmp_path):
    base = tiny(seed=3)
    save_pretrained(base, tmp_path / "base", dtype=torch.bfloat16)
    model, _ = load_pretrained(tmp_path / "base")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True))
    perturb(model)
    x = ids()
    out = model(x)
    save_adapter(model, tmp_path / "adapter")
    merge_to_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged, _ = load_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (merged.float()(x) - out).abs().max() < 0.05 * out.abs().max()  # bf16 storage of the merged weights
    with torch.no_grad():  # merged in float32 before the cast: the weights equal W0 + ΔW rounded once
        ref = L.merge_and_unload(model).model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, ref)


# --- QLoRA: a 4-bit base layer --------------------------------------------------------------------
def quantize_model(model, names=("q_proj", "v_proj", "up_proj")):
    from peftlab.quant.linear4bit import Linear4bit

    for name, m in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m, quant_type="nf4"))
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dora", [False, True])
def test_qlora_wraps_linear4bit_merges_by_dequantizing(device, dora):
    model = quantize_model(tiny(attention_bias=True)).to(device)
    n_float = sum(p.numel() for p in model.parameters())
    x = ids().to(device)
    ref = model(x)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=dora))
    assert torch.equal(model(x), ref)
    q = model.model.layers[0].self_attn.q_proj
    qbase = q.base_layer
    assert type(qbase).__name__ == "Linear4bit" and q.lora_A["default"].weight.dtype == torch.float32
    n_4bit = 2 * (64 * 64 + 64 * 32 + 64 * 96)
    n_lora = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (64 + 96)) + (2 * (64 + 32 + 96) if dora else 0)
    assert trainable_parameters_report(model).startswith(
        f"trainable params: {n_lora:,} || all params: {n_float + n_4bit + n_lora:,}")
    perturb(model)
    model(x).sum().backward()  # gradients reach the adapters through the 4-bit layer
    assert q.lora_A["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model(x)
        L.merge_adapter(model)
        assert isinstance(q.base_layer, nn.Linear) and "_pre_merge" not in "".join(model.state_dict())
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
        L.unmerge_adapter(model)
        assert q.base_layer is qbase and torch.equal(model(x), out)
        plain = L.merge_and_unload(model)
        assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
        torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)


def test_parameter_report_counts_4bit_weights_in_any_quant_storage():
    model = quantize_model(tiny())
    report = trainable_parameters_report(model)
    for layer in (0, 1):       # FSDP keeps the packed bytes as a bfloat16 parameter: same count
        model.model.layers[layer].self_attn.q_proj.set_quant_storage(torch.bfloat16)
    assert trainable_parameters_report(model) == report
    assert f"all params: {sum(p.numel() for p in tiny().parameters()):,} ||" in report


def test_qlora_merge_with_bfloat16_compute():
    from peftlab.quant.linear4bit import Linear4bit

    torch.manual_seed(0)
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.bfloat16))
    layer.update_layer("a", LoraConfig(r=4, lora_alpha=8))
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.05)
        x = torch.randn(8, 128)
        out = layer(x)
        layer.merge()
        merged = layer(x)
    assert merged.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert (merged - out).norm() / out.norm() < 1e-2  # one bfloat16 rounding of the merged weight


def test_pissa_on_4bit_is_refused():
    with pytest.raises(ConfigError, match="PiSSA"):
        get_peft_model(quantize_model(tiny()), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))


# --- LoRA+ -----------------------------------------------------------------------------------------
def _loraplus_groups(config):
    model = get_peft_model(tiny(attention_bias=True), config)
    groups = {g["name"]: g for g in L.lora_plus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.1)}
    named = {id(p): n for n, p in model.named_parameters()}
    names = {k: {named[id(p)] for p in g["params"]} for k, g in groups.items()}
    every = [n for g in names.values() for n in g]
    assert sorted(every) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    torch.optim.AdamW(list(groups.values()))  # usable as is
    return groups, names


def test_lora_plus_param_groups():
    groups, names = _loraplus_groups(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                bias="lora_only"))
    assert all(".lora_A." in n for n in names["loraplus_A"]) and groups["loraplus_A"]["lr"] == 1e-4
    assert all(".lora_B." in n or "magnitude" in n for n in names["loraplus_B"])
    assert any("magnitude" in n for n in names["loraplus_B"])
    assert groups["loraplus_B"]["lr"] == pytest.approx(16e-4) and groups["loraplus_B"]["weight_decay"] == 0.1
    assert all(n.endswith("bias") for n in names["loraplus_B_no_decay"])
    assert groups["loraplus_B_no_decay"]["weight_decay"] == 0 and len(names["loraplus_B_no_decay"]) == 4
    # LoRA on embeddings (A = 0 at init, roles swapped): a fixed small learning rate, as PEFT
    groups, names = _loraplus_groups(LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert names["loraplus_embedding"] == {"model.embed_tokens.lora_embedding_A.default",
                                           "model.embed_tokens.lora_embedding_B.default"}
    assert groups["loraplus_embedding"]["lr"] == 1e-6


# --- files -----------------------------------------------------------------------------------------
def test_save_load_roundtrip_and_misfits(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True))
    perturb(model)
    x = ids()
    out = model(x)
    save_adapter(model, tmp_path / "a")
    back = load_adapter(tiny(), tmp_path / "a")
    assert torch.equal(back(x), out)
    # a base of another shape: AdapterError naming the file and the tensor; the base is untouched
    other = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 32})).reset_parameters(seed=0)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor '.*_proj\.lora_A\.weight' has shape"):
        load_adapter(other, tmp_path / "a")
    assert wrapped(other) == [] and not hasattr(other, "peft_config")
    # targets the base does not have
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    with pytest.raises(AdapterError, match="adapter_config|c_attn"):
        load_adapter(tiny(), tmp_path / "b")
    # a tensor no targeted module owns
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterError, match="o_proj.*does not belong"):
        load_adapter(tiny(), tmp_path / "b")
    # an HF adapter whose PiSSA residual came from a random draw cannot be rebuilt
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(AdapterError, match="randomized SVD"):
        load_adapter(tiny(), tmp_path / "b")


def test_loading_a_second_adapter_onto_an_adapted_model(tmp_path):
    model = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    save_adapter(model, tmp_path)
    x = ids()
    out = model(x)
    fresh = get_peft_model(tiny(), LoraConfig(r=3, target_modules=["v_proj"]), "other")
    load_adapter(fresh, tmp_path, adapter_name="mine")
    L.set_adapter(fresh, "mine")
    assert torch.equal(fresh(x), out)
