"""LoRA adapters move both ways between peftlab and Hugging Face PEFT (test-only oracles), in float32.

(1) trained here (a few SGD steps, so B != 0) -> PeftModel.from_pretrained on the transformers
model with the same weights -> same logits; (2) saved by PEFT with random non-zero weights ->
loaded here -> same logits. DoRA gradients are compared too (the norm is detached in both).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from peftlab.models import load_pretrained
from peftlab.train.evaluate import token_loss_sum
from peftlab.tuners import get_peft_model
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.lora import LoraConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
CASES = {
    "lora": ("plain", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "dora": ("plain", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "rslora": ("plain", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True)),
    "lm_head": ("plain", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "all_linear": ("plain", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "bias_all": ("biased", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    "dora_bias": ("biased", dict(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], use_dora=True)),
    "embedding": ("plain", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    dirs = {}
    for kind, extra in {"plain": {}, "biased": dict(attention_bias=True, mlp_bias=True)}.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**BASE, **extra),
                                                           attn_implementation="eager")
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(d)
        dirs[kind] = d
    return dirs


def _hf_base(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()


def _ours_base(d):
    return load_pretrained(d, dtype=torch.float32)[0].eval()


def _train(model, steps=3, lr=0.2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=g)
        opt.zero_grad()
        loss, n = token_loss_sum(model(ids), ids)
        (loss / n).backward()
        opt.step()


def _ids():
    return torch.randint(0, BASE["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_trained_here_loads_in_peft(case, base_dirs, tmp_path):
    kind, kw = CASES[case]
    ours = get_peft_model(_ours_base(base_dirs[kind]), LoraConfig(**kw))
    _train(ours.train())
    ours.eval()
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n or "lora_embedding_A" in n)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kw["r"] and cfg["use_dora"] == kw.get("use_dora", False)
    hf = peft.PeftModel.from_pretrained(_hf_base(base_dirs[kind]), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_by_peft_loads_here(case, base_dirs, tmp_path):
    kind, kw = CASES[case]
    torch.manual_seed(3)
    hf = peft.get_peft_model(_hf_base(base_dirs[kind]), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours = load_adapter(_ours_base(base_dirs[kind]), tmp_path)
    assert all(not p.requires_grad for p in ours.parameters())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_saved_keys_equal_peft_keys(base_dirs, tmp_path):
    """Same key set, shapes and dtypes as PEFT writes, for a config touching every key family."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=False, bias="all",
              modules_to_save=["lm_head"])
    hf = peft.get_peft_model(_hf_base(base_dirs["biased"]), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    hf.save_pretrained(tmp_path / "hf")
    ours = get_peft_model(_ours_base(base_dirs["biased"]), LoraConfig(**kw))
    save_adapter(ours, tmp_path / "ours")
    a, b = load_file(tmp_path / "hf" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def _grads(model, prefix=""):
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            n = n[len(prefix):] if n.startswith(prefix) else n
            out[n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")] = p.grad
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dora_gradients_match_peft(dropout, base_dirs, tmp_path):
    """Identical outputs and gradients for A, B and m, in train mode (with dropout: same masks)."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True, lora_dropout=dropout)
    torch.manual_seed(4)
    hf = peft.get_peft_model(_hf_base(base_dirs["biased"]), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours = load_adapter(_ours_base(base_dirs["biased"]), tmp_path, is_trainable=True)
    ids = _ids()
    for model, is_hf in ((hf, True), (ours, False)):
        model.train()
        torch.manual_seed(11)
        out = model(input_ids=ids).logits if is_hf else model(ids)
        (out.float() ** 2).mean().backward()
    g_hf, g_ours = _grads(hf, "base_model.model."), _grads(ours)
    assert sorted(g_hf) == sorted(g_ours) and any("magnitude" in k for k in g_ours)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_hf[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_roundtrip_with_peft(init, base_dirs, tmp_path):
    """PiSSA changes the base into a residual: PEFT re-runs the SVD on load, and so do we. The
    randomized variant is saved converted to plain LoRA (rank 2r) so that it loads anywhere."""
    kind = "plain"
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    ours = get_peft_model(_ours_base(base_dirs[kind]), LoraConfig(**kw))
    _train(ours.train())
    ours.eval()
    save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == (4 if init == "pissa" else 8)
    hf = peft.PeftModel.from_pretrained(_hf_base(base_dirs[kind]), tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad():
        ref = ours(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        back = load_adapter(_ours_base(base_dirs[kind]), tmp_path / "ours")
        torch.testing.assert_close(back(ids), ref, atol=1e-5, rtol=1e-5)
