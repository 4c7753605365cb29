"""Triton 4-bit / 8-bit kernels are bit-exact twins of the PyTorch references.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so every
case here is small; on a CUDA machine the same cases also run on the GPU, plus larger shapes.
Bit-exact means identical bit patterns (so -0.0 vs +0.0 and bf16 rounding are caught). Every
kernel variant (quantize: ``bytes``, ``words``, ``words1``; dequantize: ``bytes``,
``tile``, ``tile1``) is forced in turn, including the fallbacks to ``bytes`` where the word
kernels do not apply.
"""
import pytest
import torch

from peftlab.errors import QuantError
from peftlab.quant import (dequantize_4bit, dequantize_4bit_reference,
                           dequantize_blockwise_8bit_reference, dynamic_map, quantize_4bit,
                           quantize_4bit_reference, quantize_blockwise_8bit_reference)

pytest.importorskip("triton")
from peftlab.kernels.quant4bit import (dequantize_4bit_triton,  # noqa: E402
                                       dequantize_blockwise_8bit_triton, forced_coding,
                                       forced_variant, last_choice, quantize_4bit_triton,
                                       quantize_blockwise_8bit_triton)
from peftlab.kernels.tuning import Candidate, Tuned  # noqa: E402

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
    ("nf4", True, torch.bfloat16, (300, 64), 512, "nearest"),     # 38 blocks, one nested block
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
@pytest.mark.parametrize("quant_type,shape", [("nf4", (1024, 4099)), ("fp4", (1024, 4099)),
                                              ("nf4", (1023, 4099))])  # n % 8 = 5: bytes only
def test_cuda_dispatch_and_large_shapes(quant_type, shape):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_4bit(w, 64, quant_type, True)                 # dispatches to Triton
    rq, rs = quantize_4bit_reference(w, 64, quant_type, True)
    assert_bit_equal(q, rq)
    assert_states_equal(s, rs)
    assert_bit_equal(dequantize_4bit(q, s), dequantize_4bit_reference(q, s))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_every_tuner_candidate_is_bit_exact():
    from peftlab.kernels.quant4bit import _dequant4, _quant4

    w = make_weight((1024, 1032), torch.bfloat16, "cuda", 64, seed=7)   # n % 8 == 0, > 2^20
    rq, rs = quantize_4bit_reference(w, 64, "nf4", True)
    for c in _quant4.candidates:
        with forced_variant("quant", c.variant, c.elems, c.num_warps):
            q, s = quantize_4bit_triton(w, 64, "nf4", True)
        assert last_choice("quant") == c.describe()
        assert_bit_equal(q, rq)
        assert_states_equal(s, rs)
    ref = dequantize_4bit_reference(rq, rs)
    for c in _dequant4.candidates:
        with forced_variant("dequant", c.variant, c.elems, c.num_warps):
            out = dequantize_4bit_triton(rq, rs)
        assert last_choice("dequant") == c.describe()
        assert_bit_equal(out, ref)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_subnormal_reciprocals_and_quotients(device, quant_type, double_quant):
    """Where a flushing division (``div.rn.ftz``) would differ: a block led by 2**127 (its
    reciprocal 2**-127 is subnormal), a block of subnormals (the 1e-38 floor), and a ragged last
    block of subnormals, whose quotients by the floor are normal; both signs, both codes."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(64, generator=g) * 2.0 ** 126
    big[0] = 2.0 ** 127
    tiny = torch.linspace(-1, 1, 64) * 1e-39
    tail = torch.linspace(-1, 1, 23) * 3e-39
    w = torch.cat([torch.randn(64, generator=g), big, tiny, tail]).to(device)
    rq, rs = quantize_4bit_reference(w, 64, quant_type, double_quant)
    kq, ks = quantize_4bit_triton(w, 64, quant_type, double_quant)
    assert_bit_equal(kq, rq)
    assert_states_equal(ks, rs)
    assert len(set(rq.view(-1)[32:64].tolist())) > 4          # the big block is not all one code


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
    assert all(r["config"].split()[0] in ("bytes", "words", "words1", "tile", "tile1")
               for r in rows if r["impl"] == "peftlab")
    with open(tmp_path / f"bench_quant_check{suffix}.csv") as f:
        checks = list(csv.DictReader(f))
    assert len(checks) == 8 and all(c["ref_packed"] == "0" and c["ref_dequant"] == "0"
                                    for c in checks)


QUANT_VARIANTS = ["bytes", "words", "words1"]
DEQUANT_VARIANTS = ["bytes", "tile", "tile1"]
VARIANT_CASES = [  # (quant_type, double_quant, dtype, shape, blocksize): n % 8 == 0 -> words
    ("nf4", True, torch.bfloat16, (3, 1000), 64),       # ragged last block (3000 % 64 = 56)
    ("fp4", False, torch.float32, (40, 32), 32),
    ("nf4", False, torch.float16, (3, 4096), 4096),     # a block spans several tile rows
    ("fp4", True, torch.bfloat16, (150, 64), 256),      # 38 blocks; nested
    ("nf4", True, torch.float32, (2, 2047), 128),       # n % 8 == 6: bytes both ways
    ("fp4", True, torch.float16, (1, 2047), 64),        # n % 8 == 7: words quant, bytes dequant
    ("nf4", True, torch.bfloat16, (25, 400), 32),       # 313 blocks (> 256): 2 nested blocks
    ("fp4", True, torch.float32, (6, 1000), 1024),      # ragged last block (6000 % 1024 = 880)
]


def _expected(variant, eligible):
    return variant if eligible else "bytes"


def _small_tiles(device):
    return device == "cpu"  # interpreted: small tiles too, so that there are many programs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", QUANT_VARIANTS)
@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize", VARIANT_CASES)
def test_forced_quant_variants_match_reference(device, variant, quant_type, double_quant, dtype,
                                               shape, blocksize):
    w = make_weight(shape, dtype, device, blocksize, seed=blocksize)
    ref_q, ref_s = quantize_4bit_reference(w, blocksize, quant_type, double_quant)
    for elems in (None, 256 if _small_tiles(device) else 16384):
        with forced_variant("quant", variant, elems):
            ker_q, ker_s = quantize_4bit_triton(w, blocksize, quant_type, double_quant)
        words_ok = ((w.numel() + 1) // 2) % 4 == 0
        assert last_choice("quant").split()[0] == _expected(variant, words_ok)
        assert_bit_equal(ker_q, ref_q)
        assert_states_equal(ker_s, ref_s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", DEQUANT_VARIANTS)
@pytest.mark.parametrize("quant_type,double_quant,dtype,shape,blocksize", VARIANT_CASES)
def test_forced_dequant_variants_match_reference(device, variant, quant_type, double_quant,
                                                 dtype, shape, blocksize):
    w = make_weight(shape, dtype, device, blocksize, seed=blocksize)
    q, s = quantize_4bit_reference(w, blocksize, quant_type, double_quant)
    tiles = (None, 256, 2048) if _small_tiles(device) else (None, 8192, 16384)
    for out, elems in zip(OUT_DTYPES, tiles):
        with forced_variant("dequant", variant, elems):
            got = dequantize_4bit_triton(q, s, out)
        assert last_choice("dequant").split()[0] == _expected(variant, w.numel() % 8 == 0)
        assert_bit_equal(got, dequantize_4bit_reference(q, s, out))


def _edge_weight(device):
    """Blocks of 64 led by +-1, so that the normalised values are the weights themselves: every
    cell edge (k + 1/2)/16 (round half to even decides them), every k/16, every NF4/FP4
    decision bound, each +-2 ulps, both signs, values near 0; then a subnormal block and a
    ragged last block (which divides instead of multiplying)."""
    from peftlab.quant.codes import decision_bounds, get_code

    f32 = torch.float32
    centre = torch.cat([torch.arange(33, dtype=f32) / 32]
                       + [decision_bounds(get_code(qt))[0].abs() for qt in ("nf4", "fp4")])
    up1 = torch.nextafter(centre, torch.tensor(2.0))
    dn1 = torch.nextafter(centre, torch.tensor(-2.0))
    near = [centre, up1, dn1, torch.nextafter(up1, torch.tensor(2.0)),
            torch.nextafter(dn1, torch.tensor(-2.0)),
            torch.tensor([0.0, 1e-45, 1e-38, 1e-30, 1e-8, 1 - 2 ** -24], dtype=f32)]
    mags = torch.cat(near).clamp(max=1.0)
    vals = torch.cat([mags, -mags, torch.tensor([-0.0])])
    blocks = torch.cat([vals, torch.zeros((-vals.numel()) % 63)]).view(-1, 63)
    lead = torch.where(torch.arange(blocks.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
    w = torch.cat([lead, blocks], dim=1).view(-1)
    subnormal = torch.linspace(-1, 1, 64) * 1e-39         # absmax below the 1e-38 floor
    return torch.cat([w, subnormal, w[:40]]).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,coding", [("nf4", None), ("nf4", "cells"), ("fp4", None)])
def test_quant_variants_at_cell_edges_and_decision_bounds(device, quant_type, coding):
    """Every variant and coding step (None: the default, NF4's guess and FP4's cells; NF4 by
    the cells too) on the edge weights."""
    w = _edge_weight(device)
    ref_q, ref_s = quantize_4bit_reference(w, 64, quant_type, False)
    for variant in QUANT_VARIANTS:
        with forced_variant("quant", variant), forced_coding(coding):
            ker_q, ker_s = quantize_4bit_triton(w, 64, quant_type, False)
        assert_bit_equal(ker_q, ref_q)
        assert_states_equal(ker_s, ref_s)


def test_forced_coding_rejects_unknown_and_missing_tables():
    from peftlab.kernels.quant4bit import _tables

    with pytest.raises(ValueError, match="unknown coding"):
        with forced_coding("bisect"):
            pass
    with pytest.raises(ValueError, match="no 'poly' coding"):
        _tables("fp4", torch.device("cpu"), "poly")


def _nearest_code(quant_type, s):
    import numpy as np
    from peftlab.quant.codes import decision_bounds, get_code

    b, order = (t.numpy() for t in decision_bounds(get_code(quant_type)))
    return order[np.searchsorted(b, s, side="left")], b


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cell_tables_reproduce_the_nearest_level_on_every_run_edge(quant_type):
    """The quantizer's cell tables against ``order[#(bounds < s)]``, at both ends of every run of
    floats that shares a cell and +-1 ulp around every bound (NumPy twin of the kernel's cell:
    the kernel side is covered by the edge weights above; a full sweep of the 2**31 floats in
    [-1, 1] was run when the tables were written)."""
    import numpy as np
    from peftlab.kernels import quant4bit_tables as q4

    thr, codes = (t.numpy() for t in q4.cell_tables(quant_type))
    runs = q4.cell_runs(q4.cell_np)
    assert sorted(c for c, _, _ in runs) == list(range(32))   # 32 cells, one run each
    _, b = _nearest_code(quant_type, np.zeros(1, np.float32))
    keys = np.array([k for _, a, e in runs for k in (a, e)] +
                    [k + d for k in q4.order_key(b) for d in (-1, 0, 1)])
    s = q4.key_float(keys)
    c = q4.cell_np(s)
    got = np.where(s > thr[c], codes[c] >> 4, codes[c] & 15)
    assert np.array_equal(got, _nearest_code(quant_type, s)[0])


def test_nf4_count_guess_is_exact_near_every_bound_and_on_random_floats():
    """NF4's poly coding (its NumPy twin ``quant4bit_tables.poly_codes``, unfused float32: the GPU may fuse, the
    margin covers it) against ``#(bounds < s)`` at every bound +-8 ulps, +-0, +-1, the smallest
    subnormals and 2**20 random floats of [-1, 1]; the margin it keeps; FP4 has no guess."""
    import numpy as np
    from peftlab.kernels import quant4bit_tables as q4

    coef, thr = q4.poly_table("nf4")
    assert q4.poly_table("fp4") is None
    _, b = _nearest_code("nf4", np.zeros(1, np.float32))
    rng = np.random.default_rng(0)
    s = np.concatenate([q4.key_float(np.add.outer(q4.order_key(b), np.arange(-8, 9)).ravel()),
                        np.array([0.0, -0.0, 1.0, -1.0, 1.0001, -1.0001, 1e-45, -1e-45],
                                 np.float32),
                        rng.uniform(-1, 1, 1 << 20).astype(np.float32)])
    assert np.array_equal(q4.poly_codes(coef, thr.numpy(), s), _nearest_code("nf4", s)[0])
    assert q4.poly_margin(coef, b, s) > 0.35


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["tile", "tile1"])
def test_word_dequant_falls_back_on_misaligned_packed(device, variant):
    w = make_weight((4, 256), torch.float32, device, 64, seed=5)
    q, s = quantize_4bit_reference(w, 64, "nf4", True)
    buf = torch.zeros(q.numel() + 1, dtype=torch.uint8, device=device)
    buf[1:] = q.view(-1)
    shifted = buf[1:].view(-1, 1)                   # storage offset 1: not word aligned
    with forced_variant("dequant", variant):
        got = dequantize_4bit_triton(shifted, s, torch.bfloat16)
    assert last_choice("dequant").startswith("bytes")
    assert_bit_equal(got, dequantize_4bit_reference(q, s, torch.bfloat16))
    with forced_variant("dequant", variant):
        dequantize_4bit_triton(q, s, torch.bfloat16)
    assert last_choice("dequant").startswith(variant)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing inf * 0
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_like_the_reference(device, double_quant, bad):
    w = torch.randn(5 * 64, device=device)
    w[3 * 64 + 7] = bad
    for fn in (quantize_4bit_reference, quantize_4bit_triton):
        with pytest.raises(QuantError, match="block 3 contains NaN or Inf values"):
            fn(w, 64, "nf4", double_quant)


def test_check_finite_absmax_trusts_a_finite_mean_and_scans_otherwise():
    from peftlab.quant.functional import check_finite_absmax

    big = torch.full((4,), 3e38)                    # finite, but the sum overflows
    mean = big.mean()
    assert not torch.isfinite(mean)
    check_finite_absmax(big, mean=mean)             # the scan finds nothing: proceed
    bad = torch.tensor([1.0, 2.0, float("nan")])
    with pytest.raises(QuantError, match="block 2"):
        check_finite_absmax(bad, mean=bad.mean())
    with pytest.raises(QuantError, match="block 2"):
        check_finite_absmax(bad)
    check_finite_absmax(torch.tensor([1.0, 2.0]), mean=torch.tensor(1.5))


def test_tuner_keeps_the_fastest_eligible_candidate_and_skips_failures():
    cands = [Candidate(v, None, {}, e, 4) for v in ("words", "bytes") for e in (1, 2)]
    times = {("words", 1): 3.0, ("words", 2): None, ("bytes", 1): 2.0, ("bytes", 2): 5.0}
    calls = []

    def time_fn(c):
        calls.append(c)
        if times[(c.variant, c.elems)] is None:
            raise RuntimeError("does not compile")
        return times[(c.variant, c.elems)]

    tuner = Tuned("dequant", cands)
    with pytest.warns(UserWarning, match="skipped 1 failing"):
        assert tuner.pick("k", ("words", "bytes"), time_fn) == cands[2]
    assert len(calls) == 4
    assert tuner.pick("k", ("words", "bytes"), time_fn) == cands[2] and len(calls) == 4  # cached
    with pytest.warns(UserWarning):
        assert tuner.pick("k2", ("words",), time_fn) == cands[0]         # bytes not eligible
    times[("words", 1)] = None
    with pytest.warns(UserWarning):                 # untimed: first that runs, in order
        assert tuner.pick("k4", ("words", "bytes"), time_fn, first_ok=True) == cands[2]
    times[("bytes", 1)] = times[("bytes", 2)] = None
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every candidate"):
        tuner.pick("k5", ("words", "bytes"), time_fn)
    for op, variant in (("dequant", "nibbles"), ("dequant", "words"), ("quant", "tile1"),
                        ("requant", "bytes")):   # each op pins only its own variants
        with pytest.raises(ValueError, match="unknown 4-bit"):
            with forced_variant(op, variant):
                pass


def test_tuner_times_a_key_first_seen_by_an_untimed_small_call(monkeypatch):
    """A size bucket straddles the tuning threshold: the untimed pick of a small tensor must not
    stand in for the timed pick of a large one in the same bucket."""
    import types

    import peftlab.kernels.tuning as tuning

    ran = []

    def launch(x, ELEMS, num_warps, tag):
        ran.append(tag)

    cands = [Candidate("words", launch, dict(tag="slow"), 1, 4),
             Candidate("bytes", launch, dict(tag="fast"), 1, 4)]
    ms = {"slow": 2.0, "fast": 1.0}

    def do_bench(fn, **kw):
        fn()
        return ms[ran[-1]]

    monkeypatch.setattr(tuning.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(tuning, "_INTERPRET", False)   # read from the environment at import
    x = types.SimpleNamespace(is_cuda=True)             # stands for a CUDA tensor
    tuner = Tuned("quant", cands)
    tuner(("bucket",), ("words", "bytes"), False, x)    # small: first eligible, untimed
    assert ran[-1] == "slow" and tuner.last.endswith("(untimed: small)")
    tuner(("bucket",), ("words", "bytes"), True, x)     # large, same key: timed
    assert ran[-1] == "fast" and tuner.last == cands[1].describe()
    n_timed = len(ran)
    tuner(("bucket",), ("words", "bytes"), True, x)     # known key: the cached pick, untimed
    assert ran[n_timed:] == ["fast"] and tuner.last == cands[1].describe()


class _CountingTuner:
    """Wraps the quantize tuner and counts the launches that go through it (a replay does not);
    writes (the tuner's report of the last pick) go to the tuner itself."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "calls", 0)

    def __call__(self, *a, **k):
        object.__setattr__(self, "calls", self.calls + 1)
        return self.inner(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays record direct CUDA launches")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_replays_its_launch_on_fresh_weights(quant_type, monkeypatch):
    """Once a key is tuned, one call records its launch and the following calls replay it
    (the tuner is not called): on a new weight, on a view of the same size one element off
    16-byte alignment (its own key) and under another coding (its own key), the results equal
    the reference, and ``last_choice`` reports what ran."""
    import peftlab.kernels.launch as L
    import peftlab.kernels.quant4bit as q4

    shape = (1024, 2048)                                  # 2**21 elements: a timed key
    quantize_4bit_triton(make_weight(shape, torch.bfloat16, "cuda", 64, 0), 64, quant_type)
    counting = _CountingTuner(q4._quant4)
    monkeypatch.setattr(q4, "_quant4", counting)
    n = shape[0] * shape[1]
    cases = [(make_weight(shape, torch.bfloat16, "cuda", 64, seed=7), None),
             (make_weight((n + 1,), torch.bfloat16, "cuda", 64, seed=8)[1:], None),
             (make_weight(shape, torch.bfloat16, "cuda", 64, seed=9), "cells")]
    for w, coding in cases:
        before, replays = counting.calls, len(L.replays)
        with forced_coding(coding):
            for _ in range(4):
                ker_q, ker_s = quantize_4bit_triton(w, 64, quant_type)
            choice = last_choice("quant")
        assert counting.calls - before <= 2            # the first (maybe) and the recording one
        assert len(L.replays) >= replays
        ref_q, ref_s = quantize_4bit_reference(w, 64, quant_type)
        assert_bit_equal(ker_q, ref_q)
        assert_states_equal(ker_s, ref_s)
        assert choice.split()[0] in ("words", "words1", "bytes") and "untimed" not in choice
    assert counting.calls <= 2 * len(cases) and len(L.replays) >= len(cases)


def test_launch_quant4_records_once_the_candidate_is_known_then_replays(monkeypatch):
    """The host logic of the replay (CPU, fakes): no replay while the key is untuned, the
    first launch with a known candidate is recorded, the next is replayed with the new
    tensors and the cached tables and reports the candidate as the tuner would; a replay that
    declines (a hook, another device) falls back to the tuner; another alignment of x, of the
    outputs or another coding is another key."""
    import peftlab.kernels.launch as L
    import peftlab.kernels.quant4bit as q4
    from peftlab.kernels.tuning import _UNTIMED

    class FakeReplay:
        def __init__(self, ok=True):
            self.calls, self.ok = [], ok

        def __call__(self, *tensors):
            self.calls.append(tensors)
            return self.ok

    class FakeTuned:
        force, _last = None, None

        def __init__(self):
            self.best, self.calls = {}, []

        def __call__(self, key, eligible, tune, *args, **kw):
            self.calls.append(key)
            if L._local.recording is not None:
                L._local.recording.append(rep)

    rep, fake = FakeReplay(), FakeTuned()
    monkeypatch.setattr(q4, "_quant4", fake)
    monkeypatch.setattr(L, "replays", {})
    monkeypatch.setattr(L, "_FAST", True)
    L._local.recording = None
    buf = torch.zeros(4096 + 4)
    x, packed, absmax = buf[:4096], torch.empty(2048, dtype=torch.uint8), torch.empty(64)
    key = (64, 4096, torch.float32, "nf4", q4._ALL)

    def go(x=x, packed=packed):
        q4._launch_quant4(key, q4._ALL, False, x, packed, absmax, 4096, 64)

    go()                                                              # untuned: the tuner
    assert len(fake.calls) == 1 and not L.replays
    cand = Candidate("words", None, dict(PACK=1), 2048, 4)
    fake.best[(*key, False)] = cand
    go()                                                              # recorded
    assert len(fake.calls) == 2 and len(L.replays) == 1 and not rep.calls
    x2 = buf[4:]                                                      # 16 bytes in: aligned
    go(x=x2)                                                          # replayed
    tables = q4._tables("nf4", x.device, None)
    assert len(fake.calls) == 2 and len(rep.calls) == 1
    assert rep.calls[0][:3] == (x2, packed, absmax)
    assert rep.calls[0][3] is tables[1] and rep.calls[0][4] is tables[2]
    assert fake._last == (cand, None, _UNTIMED)
    go(x=buf[1:4097])                                                 # x misaligned: new key
    assert len(fake.calls) == 3 and len(L.replays) == 2
    go(packed=torch.empty(2056, dtype=torch.uint8)[8:])               # outputs misaligned
    assert len(fake.calls) == 4 and len(L.replays) == 3
    with q4.forced_coding("cells"):                                   # another coding
        go()
    assert len(fake.calls) == 5 and len(L.replays) == 4
    declining = FakeReplay(ok=False)
    L.replays[next(iter(L.replays))] = declining                      # the first key's replay
    go()
    assert len(declining.calls) == 1 and len(fake.calls) == 6         # fell back to the tuner
    monkeypatch.setattr(L, "_FAST", False)                            # switched off: no replay
    go()
    assert len(fake.calls) == 7 and len(declining.calls) == 1
    L.clear_cache()
    assert not L.replays
