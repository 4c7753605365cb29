"""Fused output head + cross-entropy (peftlab/train/linear_ce.py) against the unfused logits path:
loss and gradients in float64 / float32 and under bf16 autocast, chunking edge cases, frozen
inputs, no_grad, errors; `causal_lm_loss_sum` on plain, LoRA, prompt-tuning, prefix and
modules_to_save models, the fallback cases, and the DDP / FSDP rules of `output_head`."""
import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import DataError
from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.train.evaluate import token_loss_sum
from peftlab.train.linear_ce import causal_lm_loss_sum, linear_cross_entropy, output_head
from peftlab.tuners import get_peft_model
from peftlab.tuners.lora import LoraConfig
from peftlab.tuners.prefix import PrefixTuningConfig
from peftlab.tuners.prompt import PromptTuningConfig

N, D, V = 23, 8, 11
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(dtype, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).to(device).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 0.7).to(device).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.3).to(device).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 9]] = -100
    y[12:16] = -100  # with chunk_rows=4: a whole chunk of ignored rows
    return h, w, b, y.to(device)


def _grads(loss, tensors, scale=0.37):
    """Gradients of scale * loss (a non-unit incoming gradient) w.r.t. tensors (None where none)."""
    for t in tensors:
        if t is not None:
            t.grad = None
    (loss * scale).backward()
    return [None if t is None else t.grad for t in tensors]


def _close(a, b, rel):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_rows", [1, 4, 5, N, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_unfused_loss_and_gradients(dtype, chunk_rows, bias):
    h, w, b, y = _inputs(dtype, bias)
    ref = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    ref_g = _grads(ref, (h, w, b))
    loss, n = linear_cross_entropy(h, w, y, b, chunk_rows=chunk_rows)
    assert n == int((y != -100).sum()) == N - 6
    assert loss.dtype == dtype
    _close(loss.detach(), ref.detach(), TOL[dtype])
    for got, want in zip(_grads(loss, (h, w, b)), ref_g):
        if want is not None:
            _close(got, want, TOL[dtype])
    assert not h.grad[y == -100].any()  # ignored rows get no gradient


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    h, w, b, y = _inputs(torch.float64)
    loss, n = linear_cross_entropy(h, w, torch.full_like(y, -100), b, chunk_rows=4)
    assert n == 0 and float(loss.detach()) == 0.0
    gh, gw, gb = _grads(loss, (h, w, b))
    assert gh.shape == h.shape and not gh.any() and not gw.any() and not gb.any()


def test_custom_ignore_index():
    h, w, b, y = _inputs(torch.float64)
    y = torch.where(y == -100, torch.tensor(7), y)
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=7, reduction="sum")
    loss, n = linear_cross_entropy(h, w, y, b, ignore_index=7, chunk_rows=3)
    assert n == int((y != 7).sum())
    _close(loss.detach(), ref.detach(), 1e-12)


def test_frozen_weight_and_bias_get_no_gradient():
    h, w, b, y = _inputs(torch.float64)
    w.requires_grad_(False)
    b.requires_grad_(False)
    ref_h = _grads(F.cross_entropy(F.linear(h, w, b), y, reduction="sum"), (h,))[0]
    h.grad = None
    loss, _ = linear_cross_entropy(h, w, y, b, chunk_rows=4)
    loss.backward()
    assert w.grad is None and b.grad is None
    _close(h.grad, ref_h / 0.37, 1e-10)
    # hidden frozen, head trainable: only the head's gradients
    h2 = h.detach()
    w.requires_grad_(True)
    ref_w = _grads(F.cross_entropy(F.linear(h2, w, b), y, reduction="sum"), (w,))[0] / 0.37
    w.grad = None
    loss, _ = linear_cross_entropy(h2, w, y, b, chunk_rows=4)
    loss.backward()
    assert b.grad is None
    _close(w.grad, ref_w, 1e-10)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_computes_the_loss_only(mode):
    h, w, b, y = _inputs(torch.float32)
    ref = F.cross_entropy(F.linear(h, w, b), y, reduction="sum").detach()
    with getattr(torch, mode)():
        loss, n = linear_cross_entropy(h, w, y, b, chunk_rows=5)
    assert loss.grad_fn is None and not loss.requires_grad and n == N - 6
    _close(loss, ref, 1e-5)


def test_second_backward_is_refused():
    h, w, b, y = _inputs(torch.float64)
    loss, _ = linear_cross_entropy(h, w, y, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_are_named():
    h, w, b, y = _inputs(torch.float32)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(h[None], w, y)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :3], y)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(h, w, y, b[:4])
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="labels must be an integer"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="hidden is torch.float32 but weight is torch.float64"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, y, chunk_rows=0)
    bad = y.clone()
    bad[5] = V
    with pytest.raises(DataError, match=r"labels\[5\] = 11 is outside the vocabulary \[0, 11\)"):
        linear_cross_entropy(h, w, bad)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_matches_the_autocast_logits_path(device):
    """Under autocast the head GEMMs run in bf16 like autocast F.linear; gradients come back in
    the inputs' dtype (float32) and agree with the unfused path at bf16 precision."""
    h, w, b, y = _inputs(torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = F.linear(h, w, b)
        assert logits.dtype == torch.bfloat16
        ref = F.cross_entropy(logits.float(), y, reduction="sum")
        loss, _ = linear_cross_entropy(h, w, y, b, chunk_rows=4)
    ref_g = _grads(ref, (h, w, b))
    got_g = _grads(loss, (h, w, b))
    assert loss.dtype == torch.float32
    _close(loss.detach(), ref.detach(), 1e-3)  # same bf16 logits, float32 softmax: summation order only
    for got, want, t in zip(got_g, ref_g, (h, w, b)):
        assert got.dtype == t.dtype == torch.float32
        _close(got, want, 1e-2)
    exact = _grads(F.cross_entropy(F.linear(h, w, b), y, reduction="sum"), (h,))[0]
    assert float((got_g[0] - exact).abs().max()) > 0  # it really ran in bf16


def test_bf16_inputs_without_autocast():
    """A bf16 model outside autocast: bf16 GEMMs, float32 softmax and loss, bf16 gradients."""
    h, w, b, y = (t.detach().to(torch.bfloat16).requires_grad_() if t.is_floating_point() else t
                  for t in _inputs(torch.float32))
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
    ref_g = _grads(ref, (h, w, b))
    loss, _ = linear_cross_entropy(h, w, y, b, chunk_rows=4)
    assert loss.dtype == torch.float32
    _close(loss.detach(), ref.detach(), 1e-5)  # the same bf16 logits, float32 softmax
    for got, want in zip(_grads(loss, (h, w, b)), ref_g):
        assert got.dtype == torch.bfloat16
        _close(got, want, 2e-2)


# --- causal_lm_loss_sum on peftlab models ---------------------------------------------------------
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _tiny(**extra):
    return LlamaForCausalLM(LlamaConfig(**TINY, **extra)).reset_parameters(seed=0).train()


def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


MODELS = {
    "plain": (lambda: _tiny(), True),
    "lora": (lambda: get_peft_model(_tiny(), LoraConfig(r=4, target_modules="all-linear")), True),
    "prompt_tuning": (lambda: get_peft_model(_tiny(), PromptTuningConfig(num_virtual_tokens=3)), True),
    "prefix": (lambda: get_peft_model(_tiny(), PrefixTuningConfig(num_virtual_tokens=3)), True),
    "lora_modules_to_save_head": (lambda: get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj"],
                                                                            modules_to_save=["lm_head"])), True),
    "tied_embeddings": (lambda: _tiny(tie_word_embeddings=True), True),
    "lora_on_head": (lambda: get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"])), False),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_causal_lm_loss_sum_equals_the_logits_path(name):
    build, fused = MODELS[name]
    model = _perturb(build())
    assert (output_head(model) is not None) == fused
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # padding
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    ref, n_ref = token_loss_sum(model(ids), labels)
    ref.backward()
    ref_g = {n: p.grad.clone() for n, p in params}
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss_sum(model, ids, labels)
    assert n == n_ref == int((labels[:, 1:] != -100).sum())
    assert loss.grad_fn is not None and (type(loss.grad_fn).__name__ == "LinearCrossEntropyFnBackward") == fused
    _close(loss.detach(), ref.detach(), 1e-5)
    loss.backward()
    for n_, p in params:
        _close(p.grad, ref_g[n_], 1e-5)
    with torch.no_grad():
        _close(causal_lm_loss_sum(model, ids, labels)[0], ref.detach(), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["lora", "lora_modules_to_save_head"])
def test_causal_lm_loss_sum_under_bf16_autocast(device, name):
    """The trainer's GPU step: a float32 model under bf16 autocast, fused vs the autocast logits path."""
    model = _perturb(MODELS[name][0]()).to(device)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1)).to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(ids)
        assert logits.dtype == torch.bfloat16
        ref, _ = token_loss_sum(logits, ids)
    ref.backward()
    ref_g = {n: p.grad.clone() for n, p in params}
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _ = causal_lm_loss_sum(model, ids, ids)
    assert type(loss.grad_fn).__name__ == "LinearCrossEntropyFnBackward" and loss.dtype == torch.float32
    _close(loss.detach(), ref.detach(), 1e-3)
    loss.backward()
    for n, p in params:
        assert p.grad.dtype == p.dtype == torch.float32
        _close(p.grad, ref_g[n], 1e-2)


def test_head_gradient_under_modules_to_save_reaches_the_copy_only():
    model = _perturb(get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    causal_lm_loss_sum(model, ids, ids)[0].backward()
    assert output_head(model)[0] is model.lm_head.modules_to_save["default"].weight
    assert model.lm_head.modules_to_save["default"].weight.grad.any()
    assert model.lm_head.original_module.weight.grad is None


def test_other_models_fall_back_to_the_logits():
    class Wrapper(torch.nn.Module):  # not a peftlab model: never asked for return_hidden
        def __init__(self):
            super().__init__()
            self.inner = _tiny()
            self.lm_head = self.inner.lm_head

        def forward(self, ids):
            return self.inner(ids)

    model = Wrapper()
    assert output_head(model) is None
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    loss, n = causal_lm_loss_sum(model, ids, ids)
    assert n == 10 and torch.equal(loss, token_loss_sum(model(ids), ids)[0])
    hooked = _tiny()
    hooked.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert output_head(hooked) is None
    # every hook the fused path would skip, or feed hidden states instead of logits
    for register in (lambda m: m.lm_head.register_full_backward_hook(lambda *a: None),
                     lambda m: m.register_forward_hook(lambda mod, i, o: o.clamp(max=3.0)),
                     lambda m: m.register_full_backward_hook(lambda *a: None)):
        model = _tiny()
        assert output_head(model) is not None
        handle = register(model)
        assert output_head(model) is None
        handle.remove()
        assert output_head(model) is not None
    prompt = get_peft_model(_tiny(), PromptTuningConfig(num_virtual_tokens=3))
    with prompt.register_forward_hook(lambda mod, i, o: o):
        assert output_head(prompt) is None
    assert output_head(prompt) is not None
    clamped = _tiny()
    clamped.register_forward_hook(lambda mod, i, o: o.clamp(max=0.05))  # acts on the logits
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    _close(causal_lm_loss_sum(clamped, ids, ids)[0].detach(), token_loss_sum(clamped(ids), ids)[0].detach(), 1e-6)
    from torch.nn.modules.module import register_module_forward_hook

    with register_module_forward_hook(lambda mod, i, o: None):
        assert output_head(_tiny()) is None


def test_ddp_uses_a_frozen_head_only_and_fsdp_falls_back(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.fail("needs torch.distributed without a process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(4))
        trainable = _tiny()
        assert output_head(DDP(trainable)) is None  # DDP reduces the head's gradient only inside its forward
        lora = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj"]))
        ref = token_loss_sum(lora(ids), ids)[0]
        wrapped = DDP(lora)
        assert output_head(wrapped)[0] is lora.lm_head.weight
        loss, _ = causal_lm_loss_sum(wrapped, ids, ids)
        assert type(loss.grad_fn).__name__ == "LinearCrossEntropyFnBackward"
        _close(loss.detach(), ref.detach(), 1e-5)
        sharded = _tiny()
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        assert output_head(sharded) is None
        _close(causal_lm_loss_sum(sharded, ids, ids)[0].detach(), token_loss_sum(_tiny()(ids), ids)[0].detach(), 1e-5)
    finally:
        dist.destroy_process_group()
