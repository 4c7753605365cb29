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


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [
    [(7, 2, 4.0)],                                  # one layer (o_proj, down_proj)
    [(12, 2, 4.0), (6, 3, 3.0), (6, 1, 0.5)],      # q/k/v with unequal out, r and alpha
    [(9, 4, 8.0), (9, 4, 8.0)],                    # gate/up
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_equals_plain_layers(monkeypatch, device, spec, bias, dtype):
    layers = [lora_linear(10, o, r, a, bias=bias, seed=i, device=device).to(dtype) for i, (o, r, a) in enumerate(spec)]
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 10, generator=g, dtype=dtype).to(device)
    grads_out = [torch.randn(3, 4, o, generator=g, dtype=dtype).to(device) for o, _, _ in spec]
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
    tol = TOL[dtype]
    for a, b in zip(ys_f, ys_p):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(gx_f, gx_p, **tol)
    for a, b in zip(ga_f[:-2], ga_p[:-2]):
        torch.testing.assert_close(a, b, **tol)
    if len(spec) > 1:  # the unused layer's adapters get no gradient (None, not zeros: AdamW skips them)
        assert ga_f[-2:] == [None, None] and ga_p[-2:] == [None, None]
    else:
        torch.testing.assert_close(ga_f[-2:], ga_p[-2:], **tol)


def _fast_and_plain(monkeypatch, layers, x0, loss_fn):
    """(outputs, dL/dx, adapter grads) through the fast path and the plain path, same loss_fn(ys)."""
    results = []
    for fast in (True, False):
        for m in layers:
            m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with monkeypatch.context() as mp:
            if fast:
                assert LL._fast_adapter(layers, x) == "default"
            else:
                plain(mp)
            ys = lora_forward_group(layers, x) if fast else [m(x) for m in layers]
            loss_fn(ys).backward()
        results.append(([y.detach().clone() for y in ys], x.grad, adapter_grads(layers)))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frozen", [
    ("A0",), ("B1",), ("A0", "B2"), ("B0", "B1", "B2"),   # the last: no xa columns in the forward GEMM
    ("A0", "A1", "A2"), ("A0", "A1", "A2", "B0", "B1", "B2")])
def test_group_with_some_adapters_frozen(monkeypatch, dtype, frozen):
    layers = [lora_linear(10, o, r, a, bias=i == 1, seed=i).to(dtype)
              for i, (o, r, a) in enumerate([(12, 2, 4.0), (6, 3, 3.0), (6, 1, 0.5)])]
    for f in frozen:
        m = layers[int(f[1])]
        (m.lora_A if f[0] == "A" else m.lora_B)["default"].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 8, 10, generator=g, dtype=dtype)
    w = [torch.randn(2, 8, o, generator=g, dtype=dtype) for o in (12, 6, 6)]
    (ys_f, gx_f, ga_f), (ys_p, gx_p, ga_p) = _fast_and_plain(
        monkeypatch, layers, x0, lambda ys: sum((y * wi).sum() for y, wi in zip(ys, w)))
    tol = TOL[dtype]
    torch.testing.assert_close(ys_f, ys_p, **tol)
    torch.testing.assert_close(gx_f, gx_p, **tol)
    for name, a, b in zip([f"{k}{i}" for i in range(3) for k in "AB"], ga_f, ga_p):
        assert (a is None) == (b is None) == (name in frozen)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("n", [1, 3])
def test_outputs_may_be_modified_in_place(monkeypatch, n):
    """The outputs are columns of one GEMM result; in-place ops on them (h += residual) must work
    and give the gradients of the plain path."""
    layers = [lora_linear(10, 6 + i, 2, 4.0, seed=i) for i in range(n)]
    x0 = torch.randn(16, 10, generator=torch.Generator().manual_seed(4))

    def loss(ys):
        ys[0].mul_(3.0).add_(1.0)
        return sum((y * y).sum() for y in ys)

    (ys_f, gx_f, ga_f), (ys_p, gx_p, ga_p) = _fast_and_plain(monkeypatch, layers, x0, loss)
    torch.testing.assert_close(ys_f, ys_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga_f, ga_p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoding_rows_take_the_plain_path_with_the_same_values(dtype):
    """Rows below the gate (token-by-token decoding) are refused and computed by the plain path;
    the values agree with the fast path on the same rows taken as one prefill batch."""
    layers = [lora_linear(32, o, 4, 8.0, seed=i).to(dtype) for i, o in enumerate((48, 16))]
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(6), dtype=dtype)
    with torch.no_grad():
        prefill = lora_forward_group(layers, x)
        assert prefill is not None
        for t in range(x.shape[1]):
            step = x[:, t:t + 1]                               # 4 rows; in·out / (in + out) > 4
            assert lora_forward_group(layers, step) is None
            for m, y in zip(layers, prefill):
                torch.testing.assert_close(m(step), y[:, t:t + 1], **TOL[dtype])


def test_no_grad_forward_and_frozen_adapter():
    layers = [lora_linear(10, 6, 2, 4.0, seed=i) for i in range(2)]
    x = torch.randn(5, 10)
    with torch.no_grad():
        ys = lora_forward_group(layers, x)
    for m, y in zip(layers, ys):
        ref = m.base_layer(x) + m.scaling["default"] * m.lora_B["default"](m.lora_A["default"](x))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert all(y.is_contiguous() for y in ys)  # no x Aᵀ columns formed for a backward that won't run
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
