"""Linear4bit: forward, hand-written backward, bitsandbytes state-dict compatibility."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import QuantError
from peftlab.fileio import load_safetensors, save_safetensors
from peftlab.quant import Linear4bit, dequantize_4bit, quantize_4bit
from peftlab.quant import linear4bit as linear4bit_module

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BNB_KEYS = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}


def make_linear(n_in=96, n_out=40, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,compute", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float32, torch.bfloat16)])
def test_forward_equals_dequantize_then_linear(device, dtype, compute):
    lin = make_linear(dtype=dtype, device=device)
    m = Linear4bit.from_linear(lin, "nf4", 64, True, compute_dtype=compute)
    x = torch.randn(3, 5, 96, dtype=dtype, device=device)
    cdt = compute or dtype
    expected = F.linear(x.to(cdt), dequantize_4bit(m.weight, m.quant_state, cdt),
                        lin.bias.detach().to(cdt)).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    if linear4bit_module._use_fused(x.to(cdt)):
        # CUDA, 15 rows, 16-bit compute: the fused kernel (kernels/matmul4bit.py) decodes the same
        # weights but sums in its own order (and rounds once, in float32), so the bf16 results differ
        # by roundings: relative to the output's scale, not elementwise (cancellation near zero).
        err = float((y.float() - expected.float()).norm() / expected.float().norm())
        assert err < 2 ** -7
        torch.testing.assert_close(y, expected, rtol=0, atol=2 ** -6 * float(expected.abs().max()))
    else:   # dequantize + F.linear: the same computation, bit for bit
        assert torch.equal(y, expected)
    assert m.in_features == 96 and m.out_features == 40 and m.weight.dtype == torch.uint8


class _FakeInput:
    """What `_use_fused` reads of an input: device kind, dtype, shape."""

    def __init__(self, is_cuda, dtype, rows):
        self.is_cuda, self.dtype, self.shape = is_cuda, dtype, (rows, 64)

    def numel(self):
        return self.shape[0] * self.shape[1]


def test_fused_kernel_takes_float32_only_where_torch_would_use_tf32(monkeypatch):
    use = linear4bit_module._use_fused
    limit = linear4bit_module.FUSED_MAX_ROWS
    assert use(_FakeInput(True, torch.bfloat16, limit)) and use(_FakeInput(True, torch.float16, 1))
    assert not use(_FakeInput(True, torch.bfloat16, limit + 1))
    assert not use(_FakeInput(False, torch.bfloat16, 1))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert not use(_FakeInput(True, torch.float32, 1))         # strict float32: no TF32 kernel
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert use(_FakeInput(True, torch.float32, 1))             # autocast: 16-bit matmuls anyway
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")   # TF32 allowed
    assert use(_FakeInput(True, torch.float32, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_autograd_through_dequantized_weight(device):
    lin = make_linear(device=device)
    m = Linear4bit.from_linear(lin, "fp4", 32, False, bias_trainable=True)
    w = m.dequantize()
    x = torch.randn(4, 7, 96, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = m.bias.detach().clone().requires_grad_()
    g = torch.randn(4, 7, 40, device=device)
    m(x).backward(g)
    F.linear(x_ref, w, b_ref).backward(g)
    # float32 runs dequantize + F.linear unless TF32 is allowed (then the fused kernel, in TF32)
    tol = 2e-2 if linear4bit_module._use_fused(x) else 1e-6
    assert torch.allclose(x.grad, x_ref.grad, rtol=tol, atol=tol)
    assert torch.allclose(m.bias.grad, b_ref.grad, rtol=1e-6, atol=1e-6)
    assert [n for n, p in m.named_parameters()] == ["bias"]  # the 4-bit weight is no parameter


def test_frozen_bias_gets_no_grad_and_input_grad_still_flows():
    m = Linear4bit.from_linear(make_linear(), "nf4", 64, True)
    assert not m.bias.requires_grad
    x = torch.randn(2, 96, requires_grad=True)
    m(x).sum().backward()
    assert m.bias.grad is None and x.grad is not None and x.grad.shape == (2, 96)


def test_forward_saves_only_packed_weight_not_dequantized():
    m = Linear4bit.from_linear(make_linear(n_in=256, n_out=128), "nf4", 64, True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert ((128 * 256 // 2, 1), torch.uint8) in saved
    assert not any(shape == (128, 256) for shape, _ in saved), saved
    y.sum().backward()
    assert x.grad is not None


def test_forward_goes_through_the_matmul_hook(monkeypatch):
    m = Linear4bit.from_linear(make_linear(), "nf4", 64, True)
    calls = []
    real = linear4bit_module._matmul

    def spy(x, packed, state, bias=None):
        calls.append((packed is m.weight, state is m.quant_state))
        return real(x, packed, state, bias)

    monkeypatch.setattr(linear4bit_module, "_matmul", spy)
    m(torch.randn(2, 96))
    assert calls == [(True, True)]


def test_state_dict_uses_bitsandbytes_keys_and_round_trips(tmp_path):
    m = Linear4bit.from_linear(make_linear(), "nf4", 64, True)
    sd = m.state_dict()
    assert set(sd) == BNB_KEYS
    save_safetensors(sd, tmp_path / "w.safetensors")
    loaded = load_safetensors(tmp_path / "w.safetensors")
    fresh = Linear4bit(96, 40, bias=True, quant_type="fp4", blocksize=128, double_quant=False)
    fresh.load_state_dict(loaded)
    assert fresh.quant_state.quant_type == "nf4" and fresh.quant_state.nested
    x = torch.randn(6, 96)
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.dequantize(), m.dequantize())


def test_dtype_cast_keeps_state_and_to_device_moves_it():
    m = Linear4bit.from_linear(make_linear(), "nf4", 64, True)
    before = m.quant_state.absmax.clone()
    m = m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.weight.dtype == torch.uint8
    assert m.quant_state.state2.absmax.dtype == torch.float32 and torch.equal(
        m.quant_state.absmax, before)
    if torch.cuda.is_available():
        m = m.to("cuda")
        assert m.quant_state.absmax.is_cuda and m.quant_state.state2.code.is_cuda
        assert m(torch.randn(2, 96, device="cuda", dtype=torch.bfloat16)).is_cuda


def test_loads_bitsandbytes_module_state_dict_with_identical_outputs():
    bnb = pytest.importorskip("bitsandbytes")
    # in_features 128 = 2 blocks per row: bitsandbytes' CPU forward mis-indexes absmax when a
    # row is not a whole number of blocks (see functional.py), so its outputs are only a
    # trustworthy oracle for such shapes
    lin = make_linear(n_in=128)
    for quant_type, dq in (("nf4", True), ("fp4", False)):
        theirs = bnb.nn.Linear4bit(128, 40, bias=True, quant_type=quant_type,
                                   compress_statistics=dq)
        theirs.load_state_dict(lin.state_dict())
        theirs = theirs.to("cpu").train()                     # quantized by bitsandbytes
        ours = Linear4bit(128, 40, bias=True)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(5, 128, requires_grad=True)           # grad: bnb's dequantize path
        assert torch.equal(ours(x), theirs(x))
        w_bnb = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
        assert torch.equal(ours.dequantize(), w_bnb)


def test_our_state_dict_loads_into_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    ours = Linear4bit.from_linear(make_linear(n_in=128), "nf4", 64, True)  # see above: 128
    sd = ours.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    w_bnb = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(w_bnb, ours.dequantize())


def test_functional_bitsandbytes_state_loads():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(40, 256)
    packed, state = bnb_f.quantize_4bit(w, blocksize=128, quant_type="nf4",
                                        compress_statistics=True)
    sd = {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    m = Linear4bit(256, 40, bias=False)
    m.load_state_dict(sd)
    x = torch.randn(3, 256)
    assert torch.equal(m(x), F.linear(x, bnb_f.dequantize_4bit(packed, state)))


def test_bad_state_dicts_raise_quant_error_naming_the_key():
    good = Linear4bit.from_linear(make_linear(), "nf4", 64, True).state_dict()
    m = Linear4bit(96, 40)
    missing = {k: v for k, v in good.items() if k != "weight.absmax"}
    with pytest.raises(QuantError, match="'weight.absmax'"):
        m.load_state_dict(missing)
    other = Linear4bit.from_linear(make_linear(n_in=64, n_out=40), "nf4", 64, True).state_dict()
    with pytest.raises(QuantError, match="has shape \\(40, 64\\)"):
        m.load_state_dict(other)
    short = dict(good, **{"weight.absmax": good["weight.absmax"][:-1]})
    with pytest.raises(QuantError, match="absmax has"):
        m.load_state_dict(short)
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({k: v for k, v in good.items() if not k.startswith("weight")})


def test_from_linear_without_bias_and_validation():
    m = Linear4bit.from_linear(make_linear(bias=False), "fp4", 128, False)
    assert m.bias is None and set(m.state_dict()) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"}
    packed, state = quantize_4bit(make_linear().weight.detach(), 64, "nf4", True)
    assert torch.equal(Linear4bit.from_linear(make_linear(), "nf4", 64, True).weight, packed)
    with pytest.raises(QuantError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(QuantError, match="blocksize 48"):
        Linear4bit.from_linear(make_linear(), "nf4", 48)


def test_from_weight_and_from_bnb_state_dict():
    w, b = torch.randn(40, 128), torch.randn(40)
    m = Linear4bit.from_weight(w, b, "fp4", 64, False)
    assert torch.equal(m.weight, quantize_4bit(w, 64, "fp4", False)[0])
    assert torch.equal(m.bias, b) and not m.bias.requires_grad
    sd = m.state_dict()
    m2 = Linear4bit.from_bnb_state_dict(sd, in_features=128, out_features=40,
                                        source="ckpt.safetensors: layers.0.q_proj")
    x = torch.randn(3, 128)
    assert torch.equal(m2(x), m(x)) and m2.in_features == 128 and m2.out_features == 40
    with pytest.raises(QuantError, match="ckpt.safetensors.*'weight' has shape \\(40, 128\\)"):
        Linear4bit.from_bnb_state_dict(sd, in_features=64, out_features=40,
                                       source="ckpt.safetensors")
    with pytest.raises(QuantError, match="'weight.absmax'"):
        Linear4bit.from_bnb_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})
    with pytest.raises(QuantError, match="2-D"):
        Linear4bit.from_weight(torch.randn(8))
    with pytest.raises(QuantError, match="bias has shape"):
        Linear4bit.from_weight(w, torch.randn(3))
    with pytest.raises(QuantError, match="ckpt.safetensors.*'bias' is torch.float32 \\(3,\\), expected .*\\(40,\\)"):
        Linear4bit.from_bnb_state_dict(dict(sd, bias=torch.randn(3)), source="ckpt.safetensors")


def test_overlap_probe_row_slices(capsys):
    """experiments/linear4bit_overlap_probe.py (a GPU probe for issue 6): its CPU smoke (row
    slices of a 4-bit weight decode exactly; the chunked product matches) and its refusal of
    row ranges that split a quantization block or a nested group."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "linear4bit_overlap_probe.py"
    spec = importlib.util.spec_from_file_location("linear4bit_overlap_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.smoke() == 0 and "decode exactly" in capsys.readouterr().out
    packed, state = quantize_4bit(torch.randn(96, 512) * 0.02, 64, "nf4", True)
    with pytest.raises(QuantError, match="16384-element"):
        probe.row_slice(packed, state, 8, 40)          # 8 x 512 = 4096: inside a nested group
    packed, state = quantize_4bit(torch.randn(96, 96) * 0.02, 64, "nf4", False)
    with pytest.raises(QuantError, match="64-element"):
        probe.row_slice(packed, state, 1, 96)          # 96 elements: inside a block
    assert probe.row_ranges(96, 96, 3, 64) == [(0, 32), (32, 64), (64, 96)]
