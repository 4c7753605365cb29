"""The LoRA fast path (_LoraGroupFn: one autograd node per group of layers reading one input, the
adapted weight W + s B A formed on the fly) equals the plain per-layer form, and applies only
where it is safe."""
import pytest
import torch
import torch.nn as nn

from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.tuners import get_peft_model
from peftlab.tuners import lora_layers as LL
from peftlab.tuners.lora import LoraConfig, add_adapter, merge_adapter, set_adapter
from peftlab.tuners.lora_layers import LoraLinear, lora_forward_group

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def lora_linear(in_f, out_f, r, alpha, bias=False, seed=0, device="cpu", **cfg):
    torch.manual_seed(seed)
    m = LoraLinear(nn.Linear(in_f, out_f, bias=bias).requires_grad_(False))
    m.update_layer("default", LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **cfg))
    m.active_adapters = ["default"]
    return m.to(device)


def plain(monkeypatch):
    monkeypatch.setattr(LL, "_fast_adapter", lambda layers, x: None)


def adapter_grads(layers):
    return [p.grad for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [
    [(7, 2, 4.0)],                                  # one layer (o_proj, down_proj)
    [(12, 2, 4.0), (6, 3, 3.0), (6, 1, 0.5)],      # q/k/v with unequal out, r and alpha
    [(9, 4, 8.0), (9, 4, 8.0)],                    # gate/up
])
@pytest.mark.parametrize("bias", [False, True])
def test_group_equals_plain_layers(monkeypatch, device, spec, bias):
    layers = [lora_linear(10, o, r, a, bias=bias, seed=i, device=device) for i, (o, r, a) in enumerate(spec)]
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 10, generator=g).to(device)
    grads_out = [torch.randn(3, 4, o, generator=g).to(device) for o, _, _ in spec]
    results = []
    for fast in (True, False):
        for m in layers:
            m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        if fast:
            ys = lora_forward_group(layers, x)
            assert ys is not None
        else:
            with monkeypatch.context() as mp:
                plain(mp)
                ys = [m(x) for m in layers]
        # the last output takes no part in the loss when there are several (its gradient is None)
        used = ys[:-1] if len(ys) > 1 else ys
        loss = sum((y * go).sum() for y, go in zip(used, grads_out))
        loss.backward()
        results.append(([y.detach() for y in ys], x.grad, adapter_grads(layers)))
    (ys_f, gx_f, ga_f), (ys_p, gx_p, ga_p) = results
    for a, b in zip(ys_f, ys_p):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga_f[:-2], ga_p[:-2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if len(spec) > 1:  # the unused layer's adapters get no gradient (None, not zeros: AdamW skips them)
        assert ga_f[-2:] == [None, None] and ga_p[-2:] == [None, None]
    else:
        torch.testing.assert_close(ga_f[-2:], ga_p[-2:], rtol=1e-5, atol=1e-5)


def test_no_grad_forward_and_frozen_adapter():
    layers = [lora_linear(10, 6, 2, 4.0, seed=i) for i in range(2)]
    x = torch.randn(5, 10)
    with torch.no_grad():
        ys = lora_forward_group(layers, x)
    for m, y in zip(layers, ys):
        ref = m.base_layer(x) + m.scaling["default"] * m.lora_B["default"](m.lora_A["default"](x))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    layers[0].lora_A["default"].weight.requires_grad_(False)
    ys = lora_forward_group(layers, x.requires_grad_())
    sum(y.sum() for y in ys).backward()
    assert layers[0].lora_A["default"].weight.grad is None
    assert layers[0].lora_B["default"].weight.grad is not None and x.grad is not None


def _cases():
    def dropout_training(m):
        m.lora_dropout["default"] = nn.Dropout(0.1)
        m.train()

    def hook(m):
        m.base_layer.register_forward_hook(lambda mod, inp, out: out)

    def two_active(m):
        m.update_layer("other", LoraConfig(r=2))
        m.active_adapters = ["default", "other"]

    def unfrozen_base(m):
        m.base_layer.weight.requires_grad_(True)

    def subclass_base(m):
        class MyLinear(nn.Linear):
            pass
        base = MyLinear(10, 6, bias=False)
        base.weight.data = m.base_layer.weight.data
        m.base_layer = base.requires_grad_(False)

    return {"dropout_training": dropout_training, "dora": lambda m: m.update_layer(
                "default", LoraConfig(r=2, use_dora=True)),
            "two_active": two_active, "merged": lambda m: m.merge(), "disabled": lambda m: setattr(m, "disabled", True),
            "forward_hook": hook, "bfloat16": lambda m: m.to(torch.bfloat16), "unfrozen_base": unfrozen_base,
            "subclass_base": subclass_base}


@pytest.mark.parametrize("case", sorted(_cases()))
def test_fast_path_refused(case):
    m = lora_linear(10, 6, 2, 4.0)
    x = torch.randn(4, 10)
    assert LL._fast_adapter([m], x) == "default"
    _cases()[case](m)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    assert LL._fast_adapter([m], x.to(dtype)) is None
    out = m(x.to(dtype))  # the plain path still runs
    assert out.shape == (4, 6)


def test_fast_path_needs_enough_rows_to_pay_for_forming_the_weight():
    m = lora_linear(10, 6, 2, 4.0)                     # in * out / (in + out) = 3.75 rows
    assert LL._fast_adapter([m], torch.randn(4, 10)) == "default"
    assert LL._fast_adapter([m], torch.randn(3, 10)) is None            # e.g. decoding
    assert LL._fast_adapter([m], torch.randn(2, 2, 10)) == "default"    # rows over all leading dims
    assert m(torch.randn(3, 10)).shape == (3, 6)


def test_fast_path_refuses_mixed_adapter_names_and_allows_eval_dropout():
    a, b = lora_linear(10, 6, 2, 4.0, lora_dropout=0.1), lora_linear(10, 6, 2, 4.0, seed=1)
    x = torch.randn(4, 10)
    a.eval()
    assert LL._fast_adapter([a, b], x) == "default"
    b.update_layer("other", LoraConfig(r=2))
    b.active_adapters = ["other"]
    assert LL._fast_adapter([a, b], x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LL._fast_adapter([a], x) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [{}, dict(attention_bias=True, attention_out_bias=False)])
def test_model_fast_path_matches_plain_path(monkeypatch, device, extra):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, **extra)).reset_parameters(seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False)).to(device).train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)  # 32 rows: enough
    params = [p for p in model.parameters() if p.requires_grad]
    out, groups, real = [], [], LL._fast_adapter

    def spy(layers, x):
        name = real(layers, x)
        if name is not None:
            groups.append(len(layers))
        return name

    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        with monkeypatch.context() as mp:
            if fast:  # record which groups took the fast path
                mp.setattr(LL, "_fast_adapter", spy)
            else:
                plain(mp)
            logits = model(ids)
            logits.float().logsumexp(-1).mean().backward()
        out.append((logits.detach(), [p.grad.clone() for p in params]))
    # per layer q/k/v, gate/up, o_proj, down_proj, in the forward and again in the checkpointed recompute
    assert sorted(groups) == sorted([3, 2, 1, 1] * 2 * 2)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_model_outputs_follow_adapter_switching_and_merging(monkeypatch):
    model = LlamaForCausalLM(LlamaConfig(**TINY)).reset_parameters(seed=0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    add_adapter(model, "second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))  # 24 rows: fast path
    names, real = [], LL._fast_adapter
    monkeypatch.setattr(LL, "_fast_adapter", lambda layers, x: names.append(real(layers, x)) or names[-1])
    with torch.no_grad():
        first = model(ids)
        set_adapter(model, "second")
        second = model(ids)
        assert names == ["default"] * 8 + ["second"] * 8     # 4 groups per layer, 2 layers
        merge_adapter(model)
        merged = model(ids)                                # merged: the plain path
    assert names[16:] and set(names[16:]) == {None}
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(merged, second, rtol=1e-5, atol=1e-5)
