"""Triton 4-bit / 8-bit kernels are bit-exact twins of the PyTorch references.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so every
case here is small; on a CUDA machine the same cases also run on the GPU, plus larger shapes.
Bit-exact means identical bit patterns (so -0.0 vs +0.0 and bf16 rounding are caught).
"""
import pytest
import torch

from peftlab.errors import QuantError
from peftlab.quant import (dequantize_4bit, dequantize_4bit_reference,
                           dequantize_blockwise_8bit_reference, dynamic_map, quantize_4bit,
                           quantize_4bit_reference, quantize_blockwise_8bit_reference)

pytest.importorskip("triton")
from peftlab.kernels.quant4bit import (dequantize_4bit_triton,  # noqa: E402
                                       dequantize_blockwise_8bit_triton, quantize_4bit_triton,
                                       quantize_blockwise_8bit_triton)

# Triton runs interpreted on the CPU only where there is no GPU (conftest sets TRITON_INTERPRET).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that -0.0 != +0.0 and NaNs compare."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bit_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b)), f"{int((bits(a) != bits(b)).sum())} values differ"


def assert_states_equal(a, b):
    assert_bit_equal(a.absmax, b.absmax)
    assert_bit_equal(a.code, b.code)
    assert (a.shape, a.dtype, a.blocksize, a.quant_type, a.nested) == \
           (b.shape, b.dtype, b.blocksize, b.quant_type, b.nested)
    if a.nested:
        assert_bit_equal(a.offset, b.offset)
        assert_bit_equal(a.state2.absmax, b.state2.absmax)
        assert_bit_equal(a.state2.code, b.state2.code)


def make_weight(shape, dtype, device, blocksize, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.03
    flat = w.view(-1)
    if flat.numel() > 3 * blocksize:
        flat[blocksize:2 * blocksize] = 0                        # an all-zero block
    flat[-1] = 0.0                                               # FP4 +/- zero paths
    if flat.numel() > 4:
        flat[-2], flat[-3] = 1e-4 * flat.abs().max(), -1e-4 * flat.abs().max()
    return w.to(dtype).to(device)


CASES = [  # (quant_type, double_quant, dtype, shape, blocksize, nested_rounding)
    ("nf4", True, torch.bfloat16, (3, 1001), 64, "nearest"),
    ("nf4", False, torch.float32, (33, 65), 32, "nearest"),
    ("nf4", True, torch.float16, (7, 13), 4096, "nearest"),
    ("nf4", True, torch.float32, (48, 130), 128, "lut"),
    ("nf4", False, torch.bfloat16, (1,), 64, "nearest"),
    ("fp4", True, torch.bfloat16, (3, 1001), 64, "nearest"),
    ("fp4", False, torch.float16, (17, 96), 256, "nearest"),
    ("fp4", True, torch.float32, (5, 777), 1024, "lut"),
    ("fp4", False, torch.bfloat16, (2, 2048), 2048, "nearest"),
    ("nf4", True, torch.bfloat16, (300, 64), 512, "nearest"),     # > 256 blocks: 2 nested blocks
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize,rounding", CASES)
def test_kernels_match_reference(device, quant_type, double_quant, dtype, shape, blocksize,
                                 rounding):
    w = make_weight(shape, dtype, device, blocksize)
    ref_q, ref_s = quantize_4bit_reference(w, blocksize, quant_type, double_quant, rounding)
    ker_q, ker_s = quantize_4bit_triton(w, blocksize, quant_type, double_quant, rounding)
    assert_bit_equal(ker_q, ref_q)
    assert_states_equal(ker_s, ref_s)
    for out in OUT_DTYPES:
        assert_bit_equal(dequantize_4bit_triton(ref_q, ref_s, out),
                         dequantize_4bit_reference(ref_q, ref_s, out))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_output_rounds_to_nearest_even(device):
    w = make_weight((4, 512), torch.float32, device, 64, seed=3)
    q, s = quantize_4bit_reference(w, 64, "nf4", True)
    f32 = dequantize_4bit_triton(q, s, torch.float32)
    bf = dequantize_4bit_triton(q, s, torch.bfloat16)
    assert_bit_equal(bf, f32.to(torch.bfloat16))
    truncated = (bits(f32) >> 16).to(torch.int16)
    assert int((truncated != bits(bf)).sum()) > 0  # a truncating cast would have failed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize,n,rounding,signed,dtype", [
    (256, 5000, "nearest", True, torch.float32),
    (256, 5000, "lut", True, torch.bfloat16),
    (100, 777, "nearest", False, torch.float16),
    (64, 63, "lut", False, torch.float32),
    (4096, 300, "nearest", True, torch.bfloat16),
])
def test_blockwise_8bit_kernels_match_reference(device, blocksize, n, rounding, signed, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x = (x if signed else x.abs()).to(dtype).to(device)
    x[: min(blocksize, n // 3)] = 0
    code = dynamic_map(signed, device=device)
    rq, ra = quantize_blockwise_8bit_reference(x, code, blocksize, rounding)
    kq, ka = quantize_blockwise_8bit_triton(x, code, blocksize, rounding)
    assert_bit_equal(kq, rq)
    assert_bit_equal(ka, ra)
    for out in OUT_DTYPES:
        assert_bit_equal(dequantize_blockwise_8bit_triton(rq, ra, code, blocksize, None, out),
                         dequantize_blockwise_8bit_reference(rq, ra, code, blocksize, None, out))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing inf * 0
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_entry_points_validate_like_the_reference(device):
    with pytest.raises(QuantError, match="blocksize 48"):
        quantize_4bit_triton(torch.ones(64, device=device), 48)
    with pytest.raises(QuantError, match="dtype"):
        quantize_4bit_triton(torch.ones(64, dtype=torch.int64, device=device))
    with pytest.raises(QuantError, match="NaN or Inf"):
        quantize_4bit_triton(torch.tensor([1.0, float("inf")], device=device))
    q, s = quantize_4bit_reference(torch.randn(4, 64, device=device), 64, "nf4", True)
    s.absmax = s.absmax[:2]
    with pytest.raises(QuantError, match="absmax"):
        dequantize_4bit_triton(q, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_dispatch_and_large_shapes(quant_type):
    w = torch.randn(1024, 4099, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_4bit(w, 64, quant_type, True)                 # dispatches to Triton
    rq, rs = quantize_4bit_reference(w, 64, quant_type, True)
    assert_bit_equal(q, rq)
    assert_states_equal(s, rs)
    assert_bit_equal(dequantize_4bit(q, s), dequantize_4bit_reference(q, s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_blocks_and_ragged_zero_tail(device, quant_type):
    w = torch.zeros(3 * 64 + 11, device=device)
    w[70] = 0.5  # block 1 is not all zero
    rq, rs = quantize_4bit_reference(w, 64, quant_type, True)
    kq, ks = quantize_4bit_triton(w, 64, quant_type, True)
    assert_bit_equal(kq, rq)
    assert_states_equal(ks, rs)
    _, plain = quantize_4bit_triton(w, 64, quant_type, False)
    assert plain.absmax[0].item() == 0.0 and plain.absmax[-1].item() == torch.tensor(1e-38).item()
    assert_bit_equal(dequantize_4bit_triton(kq, ks), dequantize_4bit_reference(rq, rs))


def test_bench_quant_smoke(tmp_path):
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_quant.py"
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if torch.cuda.is_available():
        bench.SHAPES = bench.SMOKE_SHAPES  # keep the test short on a GPU machine too
        rc = bench.main(["--out", str(tmp_path)])
        suffix = ""
    else:
        rc = bench.main(["--smoke", "--out", str(tmp_path)])
        suffix = "_smoke"
    assert rc == 0
    with open(tmp_path / f"bench_quant{suffix}.csv") as f:
        rows = list(csv.DictReader(f))
    ops = {(r["shape"], r["op"], r["impl"]) for r in rows}
    assert ("64x128", "dequant", "peftlab") in ops and ("33x130", "quant", "peftlab") in ops
    assert all(float(r["ms"]) > 0 and r["gpu"] and r["v_torch"] for r in rows)
    with open(tmp_path / f"bench_quant_check{suffix}.csv") as f:
        checks = list(csv.DictReader(f))
    assert len(checks) == 8 and all(c["ref_packed"] == "0" and c["ref_dequant"] == "0"
                                    for c in checks)
