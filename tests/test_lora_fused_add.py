"""The fused LoRA add (scale on the r-wide product, add inside addmm) equals the plain form."""
import pytest
import torch
import torch.nn as nn

from peftlab.tuners.lora_layers import _add_low_rank

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _plain(result, xa, lora_B, s):
    return result + lora_B(xa) * s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
@pytest.mark.parametrize("s", [1.0, 2.0, 0.37])
def test_fused_add_matches_plain_values_and_gradients(device, shape, s):
    g = torch.Generator().manual_seed(0)
    lora_B = nn.Linear(4, 12, bias=False).to(device)
    with torch.no_grad():
        lora_B.weight.copy_(torch.randn(12, 4, generator=g))
    result = torch.randn(shape, generator=g).to(device).requires_grad_()
    xa = torch.randn(*shape[:-1], 4, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(device)

    outs, grads = [], []
    for fn in (_add_low_rank, _plain):
        out = fn(result, xa, lora_B, s)
        gr = torch.autograd.grad(out, (result, xa, lora_B.weight), grad_out)
        outs.append(out)
        grads.append(gr)
    assert outs[0].shape == shape
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_add_mixed_dtypes_promote_like_plain_form():
    lora_B = nn.Linear(4, 6, bias=False)
    result = torch.randn(3, 6).to(torch.bfloat16)
    xa = torch.randn(3, 4)
    out = _add_low_rank(result, xa, lora_B, 2.0)
    ref = _plain(result, xa, lora_B, 2.0)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref)
