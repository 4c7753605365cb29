"""The fused decoder Functions (peftlab/models/fused_ops.py) equal the plain PyTorch expressions
they replace, in values and gradients: float64 to rounding, float32 to float32 rounding, under
autocast with the plain expression's dtypes, and with a retained graph run backward twice."""
import pytest
import torch
import torch.nn.functional as F

from peftlab.models.fused_ops import apply_rotary, rms_norm, swiglu

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}


def plain_swiglu(g, u):
    return F.silu(g) * u


def plain_rms_norm(x, w, eps):
    """HF LlamaRMSNorm (normalise in float32, round, weight), except that float64 stays float64."""
    dtype = x.dtype
    x32 = x if dtype == torch.float64 else x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(dtype)


def plain_rotary(x, cos, sin):  # HF apply_rotary_pos_emb
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def values_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> for the inputs that require grad."""
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*ins)
    (y * grad_out).sum().backward()
    return y.detach(), [t.grad for t in ins]


def assert_same(fused, plain, inputs, grad_out, dtype):
    (ya, ga), (yb, gb) = values_and_grads(fused, inputs, grad_out), values_and_grads(plain, inputs, grad_out)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[dtype])


# --- SwiGLU -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_swiglu_matches_plain(device, dtype, needs):
    g = rand(3, 5, 12, dtype=dtype, device=device, seed=1) * 3
    u = rand(3, 5, 12, dtype=dtype, device=device, seed=2)
    g.requires_grad_(needs[0])
    u.requires_grad_(needs[1])
    assert_same(swiglu, plain_swiglu, [g, u], rand(3, 5, 12, dtype=dtype, device=device, seed=3), dtype)


def test_swiglu_gradcheck_and_no_grad_and_broadcast():
    g, u = rand(4, 6, seed=1).requires_grad_(), rand(4, 6, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(swiglu, (g, u))
    with torch.no_grad():
        torch.testing.assert_close(swiglu(g, u), plain_swiglu(g, u), rtol=0, atol=0)
    u_row = rand(6, seed=4).requires_grad_()  # broadcasting takes the plain expression
    assert_same(swiglu, plain_swiglu, [g, u_row], rand(4, 6, seed=3), torch.float64)


# --- RMSNorm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_matches_plain(device, dtype, weight_grad):
    x = (rand(2, 7, 16, dtype=dtype, device=device, seed=1) * 4).requires_grad_()
    w = (1 + 0.5 * rand(16, dtype=dtype, device=device, seed=2)).requires_grad_(weight_grad)
    assert_same(lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: plain_rms_norm(a, b, 1e-5), [x, w],
                rand(2, 7, 16, dtype=dtype, device=device, seed=3), dtype)


def test_rms_norm_gradcheck_no_grad_and_16_bit():
    x, w = rand(5, 8, seed=1).requires_grad_(), (1 + rand(8, seed=2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    xt = rand(6, 3, 8, seed=5).transpose(0, 1)  # a non-contiguous input
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(xt, w, 1e-6), plain_rms_norm(xt, w, 1e-6), **TOL[torch.float64])
    # bfloat16: HF's float32 normalisation, rounding, then the weight: bit for bit
    xb, wb = rand(4, 8, dtype=torch.bfloat16, seed=6), (1 + rand(8, seed=7)).to(torch.bfloat16)
    assert torch.equal(rms_norm(xb, wb, 1e-6), plain_rms_norm(xb, wb, 1e-6))


# --- rotary -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotary_matches_plain(device, dtype):
    B, H, T, D = 2, 3, 5, 8
    # laid out [B, T, H, D] and viewed [B, H, T, D], as the attention projections are
    x = rand(B, T, H, D, dtype=dtype, device=device, seed=1).transpose(1, 2).requires_grad_()
    # independent halves, so that a wrong half of cos or sin in either direction shows
    cos = rand(B, 1, T, D, dtype=dtype, device=device, seed=2)
    sin = rand(B, 1, T, D, dtype=dtype, device=device, seed=3)
    dy = rand(B, H, T, D, dtype=dtype, device=device, seed=4)
    assert_same(apply_rotary, plain_rotary, [x, cos, sin], dy, dtype)


def test_rotary_gradcheck_no_grad_and_mixed_dtypes():
    x, cos, sin = rand(1, 2, 3, 4, seed=1).requires_grad_(), rand(1, 1, 3, 4, seed=2), rand(1, 1, 3, 4, seed=3)
    assert torch.autograd.gradcheck(lambda a: apply_rotary(a, cos, sin), (x,))
    with torch.no_grad():
        torch.testing.assert_close(apply_rotary(x, cos, sin), plain_rotary(x, cos, sin), **TOL[torch.float64])
    # a table wider than x (one row of x, a batch of tables) broadcasts as the plain expression does
    cos2, sin2 = rand(2, 1, 3, 4, seed=4), rand(2, 1, 3, 4, seed=5)
    assert_same(apply_rotary, plain_rotary, [x, cos2, sin2], rand(2, 2, 3, 4, seed=6), torch.float64)
    # a 16-bit x with a float32 table promotes as the plain expression does (autocast attention)
    xb = x.detach().to(torch.bfloat16)
    got, ref = apply_rotary(xb, cos.float(), sin.float()), plain_rotary(xb, cos.float(), sin.float())
    assert got.dtype == ref.dtype == torch.float32 and torch.equal(got, ref)


# --- all three: autocast, retained graphs -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_the_plain_dtypes(device):
    low = torch.bfloat16
    with torch.autocast(device, dtype=low):
        lin = torch.nn.Linear(8, 12).to(device)
        x = rand(4, 8, dtype=torch.float32, device=device, seed=1).requires_grad_()
        g, u = lin(x), lin(x * 2)                         # bfloat16 under autocast
        w = torch.ones(8, device=device, requires_grad=True)
        cos = rand(1, 1, 4, 12, dtype=torch.float32, device=device, seed=2)
        sin = rand(1, 1, 4, 12, dtype=torch.float32, device=device, seed=3)
        q = lin(x).view(1, 1, 4, 12)
        pairs = [(swiglu(g, u), plain_swiglu(g, u)), (rms_norm(x, w, 1e-6), plain_rms_norm(x, w, 1e-6)),
                 (apply_rotary(q, cos, sin), plain_rotary(q, cos, sin))]
    for got, ref in pairs:
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref)
    (pairs[0][0].sum() + pairs[1][0].sum() + pairs[2][0].sum()).backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_backward_under_autocast_stays_float32(device):
    """The backward's row dot is a GEMM (bmm): autocast must not lower it to 16 bits."""
    x = rand(6, 32, dtype=torch.float32, device=device, seed=1).requires_grad_()
    w = (1 + rand(32, dtype=torch.float32, device=device, seed=2)).requires_grad_()
    dy = rand(6, 32, dtype=torch.float32, device=device, seed=3)
    ref = torch.autograd.grad(plain_rms_norm(x, w, 1e-6), (x, w), dy)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), dy)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_retained_graph_runs_backward_twice():
    x = rand(3, 8, seed=1).requires_grad_()
    w = rand(8, seed=2)
    cos, sin = rand(1, 8, seed=3), rand(1, 8, seed=4)
    y = apply_rotary(swiglu(rms_norm(x, w, 1e-6), x), cos, sin).sum()
    first = torch.autograd.grad(y, x, retain_graph=True)[0]
    second = torch.autograd.grad(y, x)[0]
    assert torch.equal(first, second)


# --- in the decoder: fused vs plain expressions, whole model ------------------------------------
def _model_grads(device, dtype, fused, monkeypatch, checkpointing=False, autocast=False):
    from peftlab.models import LlamaConfig, LlamaForCausalLM
    from peftlab.models import llama as L
    from peftlab.tuners import get_peft_model
    from peftlab.tuners.lora import LoraConfig

    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)  # the random (init_lora_weights=False) adapters
    model = LlamaForCausalLM(cfg).reset_parameters(seed=0)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                             init_lora_weights=False))
    for n, p in model.named_parameters():  # norms trainable too, for their weight gradient
        p.requires_grad_("lora_" in n or "norm" in n)
    model = model.to(device=device, dtype=dtype).train()
    model.gradient_checkpointing_enable(checkpointing)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(L, "rms_norm", plain_rms_norm)
            mp.setattr(L, "swiglu", plain_swiglu)
            mp.setattr(L, "apply_rotary", plain_rotary)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,checkpointing", [(torch.float64, False), (torch.float32, False),
                                                 (torch.float32, True)])
def test_decoder_with_fused_ops_equals_plain_decoder(monkeypatch, device, dtype, checkpointing):
    got, got_g = _model_grads(device, dtype, True, monkeypatch, checkpointing)
    ref, ref_g = _model_grads(device, dtype, False, monkeypatch)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, **tol)
    assert got_g.keys() == ref_g.keys() and any("norm" in n for n in got_g)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_under_bf16_autocast_keeps_dtypes(monkeypatch, device):
    got, got_g = _model_grads(device, torch.float32, True, monkeypatch, autocast=True)
    ref, ref_g = _model_grads(device, torch.float32, False, monkeypatch, autocast=True)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    for n in ref_g:
        assert got_g[n].dtype == ref_g[n].dtype == torch.float32
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=5e-2, atol=5e-3)
