"""Fused 4-bit matmul (kernels/matmul4bit.py) against a float64 dequantize-then-matmul oracle.

The oracle decodes the packed bytes itself (high nibble first, blocks over the flattened
weight, nested absmax), independently of peftlab.quant's dequantizer. Kernels run interpreted
on the CPU (TRITON_INTERPRET=1, small shapes) or on CUDA when present (larger shapes). Every
kernel output buffer is poisoned with NaN first, so an unwritten tile fails the test.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from peftlab.errors import QuantError
from peftlab.kernels import matmul4bit as mm
from peftlab.quant.functional import dequantize_4bit, quantize_4bit_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"          # where the Triton kernels run (CPU: interpreter)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}


def oracle_weight(packed, state):
    """float64 W [N, K] straight from the bytes."""
    N, K = state.shape
    b = packed.reshape(-1).long().cpu()
    idx = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:N * K]
    if state.nested:
        q = state.absmax.long().cpu()
        blk2 = torch.arange(q.numel()) // state.blocksize2
        absmax = (state.code2.double().cpu()[q] * state.absmax2.double().cpu()[blk2]
                  + state.offset.double().cpu())
    else:
        absmax = state.absmax.double().cpu()
    blk = torch.arange(N * K) // state.blocksize
    return (state.code.double().cpu()[idx] * absmax[blk]).reshape(N, K)


def make(N, K, bs=64, qt="nf4", dq=True, device=DEV):
    packed, state = quantize_4bit_reference(torch.randn(N, K), blocksize=bs, quant_type=qt,
                                            double_quant=dq)
    return packed.to(device), state.to(device), oracle_weight(packed, state)


def raw(state):
    return dict(absmax2=state.absmax2, code2=state.code2, offset=state.offset)


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "NaN/Inf in the output: a tile was not written"
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).norm() / ref.norm())


# (M, N, K, blocksize, quant_type, double_quant, dtype, split_k, bias)
SMALL = [
    (1, 64, 128, 64, "nf4", True, torch.bfloat16, None, False),       # M = 1 (decode)
    (1, 96, 256, 64, "fp4", False, torch.float16, 2, True),           # split-K
    (1, 48, 1024, 128, "nf4", True, torch.bfloat16, 1, False),        # 8 K steps, BK = 64 < B
    (2, 64, 1536, 64, "nf4", False, torch.float16, 3, True),          # 8 steps per split
    (3, 70, 192, 64, "nf4", True, torch.float32, None, True),         # float32 x, tail N
    (5, 80, 192, 32, "nf4", True, torch.bfloat16, None, True),        # B = 32: BK = 32
    (17, 70, 128, 32, "fp4", True, torch.float16, 2, False),          # 2 row tiles, split-K
    (33, 96, 256, 128, "nf4", False, torch.bfloat16, None, True),     # 33 rows: BM = 64 tile
    (3, 33, 100, 64, "nf4", True, torch.bfloat16, None, False),       # blocks straddle rows
    (2, 31, 77, 32, "fp4", False, torch.float16, None, True),         # odd K: bytes too
]
LARGE = [
    (1, 4096, 4096, 64, "nf4", True, torch.bfloat16, None, False),
    (16, 4096, 4096, 64, "nf4", True, torch.bfloat16, None, True),
    (300, 1000, 2048, 64, "fp4", False, torch.float16, None, True),
    (1024, 2048, 1024, 64, "nf4", True, torch.bfloat16, None, True),
    (7, 333, 1000, 64, "nf4", True, torch.bfloat16, None, False),
]
CASES = SMALL + (LARGE if CUDA else [])
DECODERS = ["table", "prmt"] if CUDA else ["table"]     # prmt: inline PTX, GPU only


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("M,N,K,bs,qt,dq,dtype,split,has_bias", CASES)
def test_forward_matches_float64_oracle(M, N, K, bs, qt, dq, dtype, split, has_bias, decoder):
    packed, state, W = make(N, K, bs, qt, dq)
    x = torch.randn(M, K, device=DEV).to(dtype)
    bias = torch.randn(N, device=DEV).to(dtype) if has_bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    y = mm.matmul4bit_forward(x, packed, state.code, state.absmax, N, K, bs, bias=bias, out=out,
                              split_k=split, decoder=decoder, **raw(state))
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = x.double().cpu() @ W.T + (bias.double().cpu() if has_bias else 0)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("M,N,K,bs,qt,dq,dtype", [
    (5, 80, 192, 64, "nf4", True, torch.bfloat16),
    (17, 70, 128, 32, "fp4", False, torch.float16),
    (3, 33, 100, 64, "nf4", True, torch.float32),          # general (straddling) tile
] + ([(512, 4096, 1024, 64, "nf4", True, torch.bfloat16)] if CUDA else []))
def test_backward_input_matches_float64_oracle(M, N, K, bs, qt, dq, dtype, decoder):
    packed, state, W = make(N, K, bs, qt, dq)
    g = torch.randn(M, N, device=DEV).to(dtype)
    out = torch.full((M, K), float("nan"), dtype=dtype, device=DEV)
    gx = mm.matmul4bit_backward_input(g, packed, state.code, state.absmax, N, K, bs, out=out,
                                      decoder=decoder, **raw(state))
    assert rel_err(gx, g.double().cpu() @ W) < TOL[dtype]


@pytest.mark.parametrize("M,gemv", [(17, False), (3, False), (3, True)])
def test_split_k_is_deterministic_and_resets_counters(M, gemv, monkeypatch):
    monkeypatch.setattr(mm, "GEMV_MAX_M", 8 if gemv else 0)   # route small M to the GEMV or not
    packed, state, _ = make(96, 256)
    x = torch.randn(M, 256, device=DEV, dtype=torch.float16)
    args = (packed, state.code, state.absmax, 96, 256, 64)
    one = mm.matmul4bit_forward(x, *args, split_k=1, **raw(state))
    three = mm.matmul4bit_forward(x, *args, split_k=3, **raw(state))
    again = mm.matmul4bit_forward(x, *args, split_k=3, **raw(state))
    assert torch.equal(three, again)                       # fixed reduction order
    assert rel_err(three, one.float()) < 1e-3
    assert int(mm._counters(x.device, 1).abs().sum()) == 0  # left ready for the next call


@pytest.mark.parametrize("M,N,K,bs,dtype,gemv_cfg", [
    (1, 40, 512, 64, torch.bfloat16, (8, 256, 4, 1, True)),    # 4 blocks per step, 2 steps
    (4, 33, 384, 128, torch.float16, (16, 512, 4, 1, False)),  # K not a multiple of BK: masked
    (8, 24, 256, 256, torch.float32, (16, 128, 4, 1, True)),   # a step is half a block; fp32
])
def test_gemv_and_tensor_core_paths_agree_with_oracle(M, N, K, bs, dtype, gemv_cfg):
    """Both small-M kernels on the same inputs (the GEMV config is a tuple, the tensor-core one
    a dict), each against the float64 oracle, with bias and a poisoned output."""
    packed, state, W = make(N, K, bs)
    x = torch.randn(M, K, device=DEV).to(dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    ref = x.double().cpu() @ W.T + bias.double().cpu()
    dot_cfg = mm._bucket_configs(mm._FWD_BUCKETS, 16)[0]
    for cfg in (gemv_cfg, dot_cfg):
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        y = mm.matmul4bit_forward(x, packed, state.code, state.absmax, N, K, bs, bias=bias,
                                  out=out, config=cfg, split_k=2, **raw(state))
        assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 and cfg is gemv_cfg
                                  else TOL[dtype])        # the GEMV multiplies exact fp32 codes


def test_auto_decoder_equals_table_decoder_bit_for_bit():
    packed, state, _ = make(256, 512)
    x = torch.randn(16, 512, device=DEV, dtype=torch.bfloat16)
    cfg = mm._bucket_configs(mm._FWD_BUCKETS, 16)[0]          # same tiles and split: same sums
    args = (x, packed, state.code, state.absmax, 256, 512, 64)
    table = mm.matmul4bit_forward(*args, config=cfg, split_k=2, decoder="table", **raw(state))
    auto = mm.matmul4bit_forward(*args, config=cfg, split_k=2, **raw(state))
    # on a GPU "auto" is the PRMT decoder once it passed its check: identical codes, so
    # identical products; on the CPU both are the table decoder
    assert torch.equal(table, auto)
    assert mm._use_prmt(x, True, "auto") == CUDA
    assert not mm._use_prmt(x, True, "table") and not mm._use_prmt(x.float(), True, "auto")


def test_autograd_kernels_match_reference_twin():
    packed, state, W = make(72, 128)
    x0 = torch.randn(2, 3, 128, device=DEV, dtype=torch.float16)
    b0 = torch.randn(72, device=DEV, dtype=torch.float32)
    gy = torch.randn(2, 3, 72, device=DEV, dtype=torch.float16)
    outs = {}
    for impl in ("triton", "reference"):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = mm.matmul_4bit(x, packed, state, b, impl=impl)
        y.backward(gy)
        assert y.shape == (2, 3, 72) and y.dtype == torch.float16
        assert x.grad.shape == x.shape and b.grad.dtype == torch.float32
        outs[impl] = (y, x.grad, b.grad)
    for got, want in zip(outs["triton"], outs["reference"]):
        assert rel_err(got, want) < 3e-3
    xd, gd = x0.double().cpu(), gy.double().cpu().reshape(6, 72)
    assert rel_err(outs["triton"][1].reshape(6, 128), gd @ W) < 2e-3
    assert rel_err(outs["triton"][2], gd.sum(0)) < 1e-5
    assert rel_err(outs["triton"][0], xd @ W.T + b0.double().cpu()) < 2e-3


def test_cpu_dispatch_is_dequantize_then_linear():
    packed, state, _ = make(40, 128, device="cpu")
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = mm.matmul_4bit(x, packed, state)
    w = dequantize_4bit(packed, state, out_dtype=torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert torch.equal(mm.matmul_4bit_reference(x, packed, state), y)


def test_bitsandbytes_quantized_weight():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 192)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    W = bnbf.dequantize_4bit(packed, qs).double()
    x = torch.randn(3, 192, dtype=torch.float16)
    y = mm.matmul4bit_forward(x.to(DEV), packed.to(DEV), qs.code.to(DEV), qs.absmax.to(DEV), 64,
                              192, 64, absmax2=qs.state2.absmax.to(DEV),
                              code2=qs.state2.code.to(DEV), offset=qs.offset.to(DEV))
    assert rel_err(y, x.double() @ W.T) < 2e-3


def test_bad_inputs_raise_quant_error():
    packed, state, _ = make(40, 128)
    x = torch.randn(2, 128, device=DEV)
    with pytest.raises(QuantError, match="does not end in K = 128"):
        mm.matmul_4bit(torch.randn(2, 100, device=DEV), packed, state)
    with pytest.raises(QuantError, match="dtype torch.int64"):
        mm.matmul_4bit(x.long(), packed, state)
    with pytest.raises(QuantError, match="bias of shape"):
        mm.matmul_4bit(x, packed, state, torch.zeros(39, device=DEV))
    with pytest.raises(QuantError, match="impl 'cuda'"):
        mm.matmul_4bit(x, packed, state, impl="cuda")
    with pytest.raises(QuantError, match="needs 2560"):
        mm.matmul4bit_forward(x, packed[:-1], state.code, state.absmax, 40, 128, 64, **raw(state))
    with pytest.raises(QuantError, match="absmax2, code2 and offset"):
        mm.matmul4bit_forward(x, packed, state.code, state.absmax, 40, 128, 64)
    with pytest.raises(QuantError, match="decoder 'fast'"):
        mm.matmul4bit_forward(x, packed, state.code, state.absmax, 40, 128, 64, decoder="fast",
                              **raw(state))
    with pytest.raises(QuantError, match="out must be"):
        mm.matmul4bit_forward(x, packed, state.code, state.absmax, 40, 128, 64,
                              out=torch.empty(2, 40, device=DEV, dtype=torch.float16),
                              **raw(state))
    p96, s96, _ = make(8, 96)                      # K % blocksize != 0: no GEMV layout
    with pytest.raises(QuantError, match="GEMV tile config"):
        mm.matmul4bit_forward(torch.randn(1, 96, device=DEV), p96, s96.code, s96.absmax, 8, 96,
                              64, config=(8, 256, 4, 1, True), **raw(s96))


def test_benchmark_smoke_run_writes_table_csv_and_plot(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "FAIL" not in printed
    assert "MET (" in printed or "MISS " in printed                          # the M=1 target
    lines = (tmp_path / "bench_kernels_smoke.csv").read_text().splitlines()
    assert lines[0].startswith("gpu,date") and len(lines) == 1 + 2 * 6      # 2 M x 6 methods
    assert (tmp_path / "bench_kernels_roofline_smoke.png").stat().st_size > 1000
