"""The PyTorch 4-bit / 8-bit references against bitsandbytes 0.50.2 (CPU backend as oracle).

Bit-exact: packed bytes, absmax (float32 or its 8-bit codes), offset, nested absmax, code
tables and dequantized values, for NF4/FP4, double quant on/off, every blocksize 32..4096,
float32/float16/bfloat16 and ragged / odd sizes. Plus the paper's claims that are pure math
(NF4 construction, double-quant memory, NF4 error and level usage on Gaussian weights).
"""
import json
import math

import pytest
import torch

from peftlab.errors import QuantError
from peftlab.quant import (QuantState, dequantize_4bit, dequantize_4bit_reference,
                           dequantize_blockwise_8bit_reference, dynamic_map, fp4_code, int4_code,
                           nf4_code, quantize_4bit, quantize_4bit_reference,
                           quantize_blockwise_8bit, quantize_blockwise_8bit_reference)
from peftlab.quant.codes import decision_bounds
from peftlab.quant.functional import dequantize_from_code, quantize_to_code

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_quantize_blockwise_default(x, code, blocksize):
    """bitsandbytes' pure-PyTorch ("default") 8-bit kernel, bypassing its native CPU one."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


def bnb_dequantize_flat(packed, state, n):
    """bitsandbytes' dequantize over the flattened tensor (its CPU path mis-indexes absmax for
    2-D weights whose rows are shorter than a block; see functional.py). Dynamo is disabled so
    its torch.compile'd fallback runs eagerly."""
    import copy

    st = copy.copy(state)
    st.shape = torch.Size([n + n % 2])
    with torch._dynamo.config.patch(disable=True):
        return BF.dequantize_4bit(packed, st).reshape(-1)[:n]


def assert_same_state(ours, theirs, nested):
    assert torch.equal(ours.absmax, theirs.absmax)
    assert ours.absmax.dtype == theirs.absmax.dtype
    assert torch.equal(ours.code, theirs.code)
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape)
    assert ours.nested == nested == theirs.nested
    if nested:
        assert torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax)
        assert torch.equal(ours.state2.code, theirs.state2.code)
        assert ours.state2.blocksize == theirs.state2.blocksize == 256


# ---- code tables ----------------------------------------------------------------------------
def test_nf4_table_regenerated_matches_bitsandbytes():
    ours, theirs = nf4_code(), BF.get_4bit_type("nf4", device="cpu")
    assert (ours - theirs).abs().max().item() <= 1e-7
    assert torch.equal(ours, theirs)  # in fact bit-identical


def test_nf4_table_structure():
    c = nf4_code()
    assert c.numel() == 16 and bool((c[1:] > c[:-1]).all())
    assert c[0].item() == -1.0 and c[15].item() == 1.0 and c[7].item() == 0.0
    assert int((c > 0).sum()) == 8 and int((c < 0).sum()) == 7


def test_fp4_table_matches_bitsandbytes_values_and_order():
    assert torch.equal(fp4_code(), BF.get_4bit_type("fp4", device="cpu"))
    assert not torch.signbit(fp4_code()[8])  # bitsandbytes' "-0" is a plain zero
    assert fp4_code()[3].item() == 1.0 and fp4_code()[1].item() == pytest.approx(0.0625 / 12)


def test_int4_table_is_symmetric_grid_in_bitsandbytes_order():
    # bitsandbytes 0.50.2's get_4bit_type("int4") fails (integer tensor divided in place)
    expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]) / 7.0
    assert torch.equal(int4_code(), expected)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    ours = dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.numel() == 256
    assert torch.equal(ours, BF.create_dynamic_map(signed=signed))


def test_decision_bounds_fp4_stable_order():
    bounds, order = decision_bounds(fp4_code())
    assert order.tolist()[7:9] == [0, 8]  # the two zeros: lower index first
    assert bool((bounds[1:] >= bounds[:-1]).all())


# ---- 4-bit bit-exactness --------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_bit_exact_vs_bitsandbytes(blocksize, dtype, quant_type, double_quant):
    g = torch.Generator().manual_seed(blocksize + 7 * double_quant)
    shape = (37, 173)  # 6401 elements: odd count, ragged last block for every blocksize
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w.view(-1)[blocksize:2 * blocksize] = 0  # one all-zero block
    theirs_q, theirs = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
    ours_q, ours = quantize_4bit_reference(w, blocksize, quant_type, double_quant,
                                           nested_rounding="lut")
    assert ours_q.shape == theirs_q.shape == ((w.numel() + 1) // 2, 1)
    assert ours_q.dtype == torch.uint8
    assert torch.equal(ours_q, theirs_q)
    assert_same_state(ours, theirs, double_quant)
    ours_w = dequantize_4bit_reference(ours_q, ours)
    assert ours_w.dtype == dtype and ours_w.shape == w.shape
    assert torch.equal(ours_w.reshape(-1), bnb_dequantize_flat(theirs_q, theirs, w.numel()))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_nearest_matches_bitsandbytes_pytorch_backend(quant_type):
    w = torch.randn(64, 1000) * 0.02
    ours_q, ours = quantize_4bit_reference(w, 64, quant_type, True, nested_rounding="nearest")
    absmax = quantize_4bit_reference(w, 64, quant_type, False)[1].absmax
    offset = absmax.mean()
    q2, a2 = bnb_quantize_blockwise_default(absmax - offset, BF.create_dynamic_map(), 256)
    assert torch.equal(ours.offset, offset)
    assert torch.equal(ours.absmax, q2) and torch.equal(ours.state2.absmax, a2)
    # and the lut variant differs from nearest somewhere, but only by a few code steps
    lut = quantize_4bit_reference(w, 64, quant_type, True, nested_rounding="lut")[1]
    diff = (lut.absmax.int() - ours.absmax.int()).abs()
    assert diff.max().item() <= 8


def test_nibble_order_odd_count_and_padding():
    w = torch.tensor([1.0, -1.0, 0.0])
    q, st = quantize_4bit_reference(w, 64, "nf4", False)
    assert q.view(-1).tolist() == [0xF0, 0x77]  # first element high; pad = code of 0.0 (7)
    q, st = quantize_4bit_reference(w, 64, "fp4", False)
    assert q.view(-1).tolist() == [0x3B, 0x00]  # FP4 +1 = 3, -1 = 11; 0 -> index 0
    assert dequantize_4bit_reference(q, st).tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_go_to_the_lower_level(quant_type):
    code = nf4_code() if quant_type == "nf4" else fp4_code()
    bounds, order = decision_bounds(code)
    k = 10
    above = torch.nextafter(bounds[k], torch.tensor(2.0))
    w = torch.stack([torch.tensor(1.0), bounds[k], above, torch.tensor(0.0)])  # absmax 1
    q, _ = quantize_4bit_reference(w, 32, quant_type, False)
    q = q.view(-1)
    assert (q[0] & 15).item() == order[k].item()          # tie -> lower level
    assert (q[1] >> 4).item() == order[k + 1].item()      # one ulp above -> upper level
    assert torch.equal(q, BF.quantize_4bit(w, blocksize=32, quant_type=quant_type)[0].view(-1))


def test_all_zero_blocks_match_bitsandbytes():
    w = torch.zeros(64 + 10)  # one full zero block and a ragged zero tail
    q, st = quantize_4bit_reference(w, 64, "nf4", False)
    assert set(q.view(-1).tolist()) == {0x77}
    assert st.absmax[0].item() == 0.0 and st.absmax[1].item() == torch.tensor(1e-38).item()
    tq, tst = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q, tq) and torch.equal(st.absmax, tst.absmax)
    assert bool((dequantize_4bit_reference(q, st) == 0).all())


def test_dispatch_on_cpu_is_the_reference():
    w = torch.randn(33, 65, dtype=torch.bfloat16)
    q1, s1 = quantize_4bit(w)
    q2, s2 = quantize_4bit_reference(w)
    assert torch.equal(q1, q2) and torch.equal(s1.absmax, s2.absmax)
    assert torch.equal(dequantize_4bit(q1, s1), dequantize_4bit_reference(q2, s2))
    assert dequantize_4bit(q1, s1, torch.float32).dtype == torch.float32


# ---- 8-bit blockwise ------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [256, 64, 100, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_bit_exact_vs_bitsandbytes(blocksize, dtype, signed):
    g = torch.Generator().manual_seed(blocksize)
    x = torch.randn(5003, generator=g).to(dtype)
    x = x if signed else x.abs()
    x[:blocksize] = 0
    code = dynamic_map(signed)
    q_lut, a_lut = quantize_blockwise_8bit_reference(x, code, blocksize, "lut")
    tq, ta = torch.ops.bitsandbytes.quantize_blockwise.default(x, code, blocksize)
    assert torch.equal(q_lut, tq) and torch.equal(a_lut, ta)
    q, a = quantize_blockwise_8bit(x, code, blocksize)  # default: nearest
    tq, ta = bnb_quantize_blockwise_default(x, code, blocksize)
    assert torch.equal(q, tq) and torch.equal(a, ta)
    for out in DTYPES:
        theirs = torch.ops.bitsandbytes.dequantize_blockwise.default(q, a, code, blocksize, out)
        assert torch.equal(dequantize_blockwise_8bit_reference(q, a, code, blocksize, None, out),
                           theirs)


def test_blockwise_8bit_is_nearest_code():
    x = torch.randn(4096)
    code = dynamic_map(True)
    q, a = quantize_blockwise_8bit_reference(x, code, 256)
    s = (x.view(16, 256) / a.unsqueeze(1)).view(-1)
    best = (s.unsqueeze(1) - code.unsqueeze(0)).abs().min(dim=1).values
    assert bool(((s - code[q.long()]).abs() <= best + 1e-7).all())


# ---- paper claims ---------------------------------------------------------------------------
def test_double_quant_memory_cost_measured():
    n_out, n_in = 64, 8192
    w = torch.randn(n_out, n_in)
    n = w.numel()
    _, plain = quantize_4bit_reference(w, 64, "nf4", False)
    _, dq = quantize_4bit_reference(w, 64, "nf4", True)

    def bits(t):
        return t.numel() * t.element_size() * 8

    plain_bits = bits(plain.absmax) / n
    dq_bits = (bits(dq.absmax) + bits(dq.state2.absmax) + bits(dq.offset)) / n
    assert plain_bits == 32 / 64 == 0.5
    assert dq_bits == pytest.approx(8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert dq_bits == pytest.approx(0.127, abs=1e-3)


def test_nf4_lowest_error_and_high_level_entropy_on_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    mse = {}
    for name, code in (("nf4", nf4_code()), ("fp4", fp4_code()), ("int4", int4_code())):
        idx, absmax = quantize_to_code(w, code, 64)
        mse[name] = (dequantize_from_code(idx, absmax, code, 64, w.shape) - w).pow(2).mean().item()
        if name == "nf4":
            p = torch.bincount(idx.long(), minlength=16).double() / idx.numel()
            entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
    assert mse["nf4"] < mse["fp4"] and mse["nf4"] < mse["int4"], mse
    assert entropy > 3.8


# ---- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(w=torch.ones(8, dtype=torch.int32)), "dtype"),
    (dict(w=torch.ones(8), blocksize=48), "blocksize 48"),
    (dict(w=torch.ones(8), quant_type="nf5"), "quant_type"),
    (dict(w=torch.ones(0)), "no elements"),
    (dict(w=torch.tensor([1.0, float("nan")])), "NaN"),
    (dict(w=torch.ones(8), nested_rounding="up"), "nested_rounding"),
])
def test_quantize_bad_inputs(kwargs, match):
    with pytest.raises(QuantError, match=match):
        quantize_4bit_reference(**kwargs)


def test_dequantize_bad_state():
    q, st = quantize_4bit_reference(torch.randn(10, 64), 64, "nf4", False)
    bad = st.to("cpu")
    bad.absmax = bad.absmax[:-1]
    with pytest.raises(QuantError, match="absmax has 9 values, expected 10"):
        dequantize_4bit_reference(q, bad)
    bad = st.to("cpu")
    bad.shape = torch.Size([10, 63])  # same block count, fewer elements than packed holds
    with pytest.raises(QuantError, match="packed weight has 320 bytes but shape"):
        dequantize_4bit_reference(q, bad)
    with pytest.raises(QuantError, match="uint8"):
        dequantize_4bit_reference(q.float(), st)
    with pytest.raises(QuantError, match="out_dtype"):
        dequantize_4bit_reference(q, st, torch.int8)
    with pytest.raises(QuantError, match="blocksize"):
        quantize_blockwise_8bit_reference(torch.ones(4), None, 0)


# ---- QuantState serialization ---------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_state_as_dict_matches_bitsandbytes_bytes(double_quant, quant_type):
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    _, theirs = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                 compress_statistics=double_quant)
    _, ours = quantize_4bit_reference(w, 64, quant_type, double_quant, nested_rounding="lut")
    a, b = ours.as_dict(packed=True), theirs.as_dict(packed=True)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    meta = json.loads(bytes(a[f"quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["shape"] == [48, 80] and meta["dtype"] == "bfloat16"
    back = QuantState.from_dict(b)             # theirs -> ours
    assert_same_state(back, theirs, double_quant)
    again = BF.QuantState.from_dict(dict(a), device="cpu")   # ours -> theirs
    assert_same_state(ours, again, double_quant)


def test_quant_state_from_dict_errors_name_the_key():
    _, st = quantize_4bit_reference(torch.randn(16, 64), 64, "nf4", True)
    d = st.as_dict(packed=True)
    missing = {k: v for k, v in d.items() if k != "nested_absmax"}
    with pytest.raises(QuantError, match="'weight.nested_absmax'"):
        QuantState.from_dict(missing, key_prefix="weight.")
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(QuantError, match="bitsandbytes__nf4.*JSON"):
        QuantState.from_dict(bad)
    wrong = dict(d)
    wrong["quant_state.bitsandbytes__fp4"] = wrong.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(QuantError, match="does not match quant_type"):
        QuantState.from_dict(wrong)
    short = dict(d)
    short["absmax"] = short["absmax"][:3]
    with pytest.raises(QuantError, match="absmax has 3 values"):
        QuantState.from_dict(short)
    extra = dict(d, bogus=torch.zeros(1))
    with pytest.raises(QuantError, match="'bogus'"):
        QuantState.from_dict(extra)


def test_quant_state_to_returns_moved_copy():
    _, st = quantize_4bit_reference(torch.randn(8, 64), 64, "nf4", True)
    moved = st.to("cpu")
    assert moved is not st and torch.equal(moved.absmax, st.absmax)
    assert moved.absmax2 is moved.state2.absmax and moved.blocksize2 == 256
    assert moved.code2.numel() == 256


# ---- property test --------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300),
       blocksize=st.sampled_from(BLOCKSIZES), dtype=st.sampled_from(DTYPES),
       quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(),
       log_scale=st.floats(-6, 3), seed=st.integers(0, 2**16), zero_frac=st.floats(0, 0.5))
def test_property_reference_matches_bitsandbytes(rows, cols, blocksize, dtype, quant_type,
                                                 double_quant, log_scale, seed, zero_frac):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * math.exp(log_scale)
    w[torch.rand(rows, cols, generator=g) < zero_frac] = 0
    w = w.to(dtype)
    tq, ts = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                              compress_statistics=double_quant)
    q, s = quantize_4bit_reference(w, blocksize, quant_type, double_quant, nested_rounding="lut")
    assert torch.equal(q, tq)
    assert_same_state(s, ts, double_quant)
    assert torch.equal(dequantize_4bit_reference(q, s).reshape(-1),
                       bnb_dequantize_flat(tq, ts, w.numel()))
