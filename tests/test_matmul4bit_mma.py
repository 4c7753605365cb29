"""The small-M mma.sync 4-bit matmul (kernels/matmul4bit_mma.py, dispatched by matmul4bit.py).

Its inline PTX (mma.sync, prmt) runs only on a GPU: there the kernel is checked against the
float64 dequantize-then-matmul oracle of test_matmul4bit.py for every tile of MMA_CONFIGS,
into NaN-poisoned outputs. On the CPU: which calls the dispatch sends to the kernel (device
checks stubbed, the kernel replaced by a recorder), the split-K sizing, the PTX programs (their
structure; the shared-table decoder run by an emulator), and the refusals of a pinned config.
"""
import re

import pytest
import torch

from peftlab.errors import QuantError
from peftlab.kernels import matmul4bit as mm
from peftlab.kernels import matmul4bit_mma as mk
from test_matmul4bit import DEV, make, raw, rel_err

CUDA = torch.cuda.is_available()


def test_mma_ptx_chains_four_mmas_from_zero():
    for ab, asm in (("bf16", mk._MMA_BF16.value), ("f16", mk._MMA_F16.value)):
        mmas = [ln for ln in asm.splitlines() if ln.startswith("mma.sync")]
        assert len(mmas) == 4 and all(f".f32.{ab}.{ab}.f32" in ln for ln in mmas)
        assert mmas[0].endswith("{z, z, z, z};")                  # C starts at zero
        assert all(ln.endswith("{d0, d1, d2, d3};") for ln in mmas[1:])   # then accumulates
        used = sorted(int(v) for ln in mmas for v in re.findall(r"\$(\d+)", ln))
        assert used == list(range(4, 28))           # 16 A + 8 B operands, each used once
    n_ops = len(mk._MMA_CONSTRAINTS.value.split(","))
    assert n_ops == 28 and mk._MMA_CONSTRAINTS.value.count("=f") == 4


@pytest.mark.parametrize("cfg,M,N,K", [
    (cfg, M, N, K) for cfg in mk.MMA_CONFIGS
    for M, N, K in [(1, 4096, 4096), (16, 28672, 8192), (3, 100, 1024), (1, 64, 16384)]
    if K % cfg.chunk() == 0])                       # the tuner offers only these
def test_mma_splits_cover_k_in_whole_chunks(cfg, M, N, K):
    chunk = cfg.chunk()
    s, per = mk._mma_splits(cfg, M, N, K, torch.device("cpu"))
    assert per % chunk == 0 and 1 <= s <= mm.MAX_SPLIT
    assert s * per >= K and (s - 1) * per < K                    # all of K, no empty split


@pytest.mark.parametrize("split_k", [1, 3, 64])
def test_pinned_split_k_gives_whole_chunks(split_k):
    cfg = mk.MmaTile(4, 2, 4)
    s, per = mk._mma_splits(cfg, 1, 4096, 8192, torch.device("cpu"), split_k)
    assert per % (64 * 4 * 2) == 0 and (s - 1) * per < 8192 <= s * per
    assert s == min(split_k, 8192 // (64 * 4 * 2))     # fewer splits than asked if K is short


def test_dispatch_sends_only_eligible_calls_to_the_mma_kernel(monkeypatch):
    """With the device checks passed (as on a GPU), record which calls reach the mma kernel;
    the others run the tiled kernel (interpreted here) and must still be right."""
    packed, state, W = make(64, 256)
    calls = []
    monkeypatch.setattr(mk, "_mma_device_unfit", lambda x: None)
    monkeypatch.setattr(mm, "_mma", lambda *a, **k: calls.append((a[4], a[7], k)))   # M, tile
    args = (packed, state.code, state.absmax, 64, 256, 64)

    def run(x, **kw):
        calls.clear()
        y = mm.matmul4bit_forward(x, *args, **kw, **raw(state))
        return bool(calls), y

    xb = torch.randn(2, 256, device=DEV, dtype=torch.bfloat16)
    assert run(xb)[0] and calls[0][2]["check"] is False            # default: M = 2, bf16
    assert run(xb, config=("mma", 4, 1, 8))[0] and calls[0][1] == (4, 1, 8)
    assert run(xb, config=mk.MmaTile(2, 2, 8))[0]                   # a tile on its own
    for kw in (dict(decoder="table"), dict(config=mm._bucket_configs(mm._FWD_BUCKETS, 16)[0])):
        taken, y = run(xb, **kw)
        assert not taken and rel_err(y, xb.double().cpu() @ W.T) < 1e-2
    x17 = torch.randn(17, 256, device=DEV, dtype=torch.bfloat16)
    assert not run(x17)[0] and not run(xb.float())[0]
    monkeypatch.setattr(mm, "MMA_MAX_M", 64)                         # never past 16 rows
    assert not run(x17)[0]
    monkeypatch.setenv("PEFTLAB_4BIT_MMA", "0")
    assert not run(xb)[0]


def test_mma_path_is_cuda_only_and_refuses_what_it_cannot_run():
    packed, state, _ = make(64, 256)
    x = torch.randn(2, 256, device=DEV, dtype=torch.bfloat16)
    args = (x, packed, state.code, state.absmax, 64, 256, 64)
    q = mm._Quant(packed, state.code, state.absmax, 64, 256, 64, state.absmax2, state.code2,
                  state.offset, 256)
    assert mm._mma_ok(x, q, 2, "auto") == CUDA
    if not CUDA:
        with pytest.raises(QuantError, match="needs a CUDA tensor"):
            mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8), **raw(state))
    with pytest.raises(QuantError, match="decodes with PRMT"):
        mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8), decoder="table", **raw(state))
    with pytest.raises(QuantError, match="is not \\(warps, unroll"):
        mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8, False, 5), **raw(state))
    with pytest.raises(QuantError, match="split_k must be a positive int"):
        mm.matmul4bit_forward(*args, split_k=0, **raw(state))
    p96, s96, _ = make(8, 96, bs=32)
    q96 = mm._Quant(p96, s96.code, s96.absmax, 8, 96, 32, s96.absmax2, s96.code2, s96.offset,
                    256)
    x96 = torch.randn(1, 96, device=DEV, dtype=torch.bfloat16)
    assert "multiples of 64" in mk._mma_unfit(x96, q96)
    assert "takes bfloat16 or float16" in mk._mma_unfit(x.float(), q)
    with pytest.raises(QuantError, match="unroll must be 1, 2 or 4"):   # before any device check
        mm.matmul4bit_forward(*args, config=("mma", 1, 3, 4), **raw(state))
    if CUDA:
        with pytest.raises(QuantError, match="which do not divide K = 256"):
            mm.matmul4bit_forward(*args, config=("mma", 4, 2, 4), **raw(state))


@pytest.mark.skipif(not CUDA, reason="mma.sync and prmt are inline PTX: CUDA only")
@pytest.mark.parametrize("M,N,K,bs,qt,dq,dtype,has_bias", [
    (1, 1000, 4096, 64, "nf4", True, torch.bfloat16, False),     # tail row tile
    (3, 520, 2048, 64, "fp4", True, torch.float16, True),
    (8, 4096, 1024, 64, "nf4", False, torch.bfloat16, True),     # one column group, full
    (9, 777, 2048, 128, "nf4", True, torch.bfloat16, False),     # two column groups
    (16, 300, 4096, 256, "fp4", False, torch.float16, True),
])
def test_mma_kernel_matches_float64_oracle_for_every_tile(M, N, K, bs, qt, dq, dtype, has_bias):
    packed, state, W = make(N, K, bs, qt, dq)
    x = torch.randn(M, K, device=DEV).to(dtype)
    bias = torch.randn(N, device=DEV).to(dtype) if has_bias else None
    ref = x.double().cpu() @ W.T + (bias.double().cpu() if has_bias else 0)
    tiles = [None] + [("mma",) + c for c in mk.MMA_CONFIGS if K % c.chunk() == 0]
    for cfg in tiles:
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        y = mm.matmul4bit_forward(x, packed, state.code, state.absmax, N, K, bs, bias=bias,
                                  out=out, config=cfg, **raw(state))
        assert rel_err(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), cfg


@pytest.mark.skipif(not CUDA, reason="mma.sync and prmt are inline PTX: CUDA only")
def test_mma_split_k_is_deterministic_and_resets_counters():
    packed, state, W = make(512, 4096)
    x = torch.randn(4, 4096, device=DEV, dtype=torch.bfloat16)
    args = (x, packed, state.code, state.absmax, 512, 4096, 64)
    one = mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8), split_k=1, **raw(state))
    three = mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8), split_k=3, **raw(state))
    again = mm.matmul4bit_forward(*args, config=("mma", 4, 1, 8), split_k=3, **raw(state))
    assert torch.equal(three, again)
    assert rel_err(three, one.float()) < 1e-2 and rel_err(three, x.double().cpu() @ W.T) < 1e-2
    assert int(mm._counters(x.device, 1).abs().sum()) == 0


def test_shared_pair_table_program_decodes_every_byte():
    """The LUT decoder's PTX run by a small emulator (prmt, mad.lo, ld.shared on a dict) against
    the 256-entry pair table: every byte value in every position of the word."""
    from test_decode4bit import M32, prmt      # the PTX emulator's prmt semantics
    table = torch.randn(16).to(torch.bfloat16)
    pairs = [int(v) & M32 for v in mk._pairs(table).tolist()]
    bits = (table.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    assert all(pairs[b] == bits[b >> 4] | bits[b & 15] << 16 for b in range(256))
    lane, base = 5, 0x1000
    smem = {base + (e * 32 + lane) * 4: pairs[e] for e in range(256)}   # copy `lane` only
    words = [(b | (b + 85) % 256 << 8 | (b + 170) % 256 << 16 | (255 - b) << 24)
             for b in range(256)]
    for w in words:
        regs = {"$4": w, "$5": base + 4 * lane, "0": 0}
        for line in mk._LUT_PAIRS.value.splitlines():
            line = line.strip().rstrip(";")
            if not line or line[0] in "{}." or line.startswith(".reg"):
                continue
            op, rest = line.split(None, 1)
            dst, *args = [t.strip() for t in rest.split(",")]
            if op == "prmt.b32":
                regs[dst] = prmt(regs[args[0]], int(args[1], 0), int(args[2], 0))
            elif op == "mad.lo.u32":
                regs[dst] = (regs[args[0]] * int(args[1], 0) + regs[args[2]]) & M32
            else:
                assert op == "ld.shared.b32"
                regs[dst] = smem[regs[args[0].strip("[]")]]
        assert [regs[f"${j}"] for j in range(4)] == [pairs[(w >> 8 * j) & 255] for j in range(4)]


@pytest.mark.skipif(not CUDA, reason="mma.sync and prmt are inline PTX: CUDA only")
def test_shared_table_and_prmt_decoders_give_identical_results():
    packed, state, _ = make(333, 2048)
    x = torch.randn(5, 2048, device=DEV, dtype=torch.bfloat16)
    args = (x, packed, state.code, state.absmax, 333, 2048, 64)
    lut = mm.matmul4bit_forward(*args, config=("mma", 4, 2, 4, True), **raw(state))
    prm = mm.matmul4bit_forward(*args, config=("mma", 4, 2, 4, False), **raw(state))
    assert torch.equal(lut, prm)                 # same codes, same MMAs, same order


def test_launcher_passes_every_kernel_argument_and_sizes_the_grid(monkeypatch):
    """The host launcher on the CPU with the kernel replaced by a recorder (the device checks
    stubbed): every argument of the kernel's signature passed by name or position, the grid =
    row tiles x splits, the constexprs derived from the weight and the tile; the tuner path too
    (its timing stubbed)."""
    names = mk._mm4_mma_kernel.arg_names
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                kw.pop("num_warps")
                assert sorted(names[:len(args)] + list(kw)) == sorted(names)
                launches.append((grid, dict(zip(names, args)), kw))
            return launch

    monkeypatch.setattr(mk, "_mm4_mma_kernel", Recorder())
    monkeypatch.setattr(mk, "_mma_device_unfit", lambda x: None)
    # the stubbed timing makes the first unsplit alternative win (trials run in candidate order)
    cands = mk._mma_candidates(9, 1000, 4096, torch.device("cpu"), None)
    win = next(i for i, (_, split) in enumerate(cands) if split == 1)
    trial = iter(range(10 * len(cands)))
    monkeypatch.setattr(mk.tuning, "graph_ms",
                        lambda fn, calls=10: (fn(), 0.5 if next(trial) == win else 1.0)[1])
    monkeypatch.setattr(mk, "_MMA_BEST", {})
    monkeypatch.setattr(mk, "MMA_TIMES", {})
    monkeypatch.setenv("PEFTLAB_GEMV_TUNE", "1")       # conftest turns tuning off on CUDA hosts
    packed, state, _ = make(1000, 4096, bs=128)
    q = mm._Quant(packed, state.code, state.absmax, 1000, 4096, 128, state.absmax2, state.code2,
                  state.offset, 256)
    x = torch.randn(9, 4096, dtype=torch.bfloat16)
    out = torch.empty(9, 1000, dtype=torch.bfloat16)
    for tile in mk.MMA_CONFIGS:
        mk._mma(x, q, None, out, 9, 1000, 4096, tile, None)
        grid, args, kw = launches[-1]
        s, per = mk._mma_splits(tile, 9, 1000, 4096, x.device)
        assert grid == (63 * s,) and args["TILES"] == 63 and args["N_SPLIT"] == s
        assert args["PER"] == per and kw["UNROLL"] == tile.unroll and kw["WARPS"] == tile.warps
        assert kw["NCOL"] == 2 and kw["BS_SHIFT"] == 4 and kw["BS2_SHIFT"] == 8     # 128 / 8
    n0 = len(launches)
    mk._mma(x, q, None, out, 9, 1000, 4096, None, None)        # tuned: (tile, split) candidates
    assert len(cands) > len(mk.MMA_CONFIGS)                          # some split, also unsplit
    assert len(launches) == n0 + len(cands) + 1                       # each trial, the pick
    trials = launches[n0:-1]
    for (tile, split), (grid, args, kw) in zip(cands, trials):
        s, _ = mk._mma_splits(tile, 9, 1000, 4096, x.device, split)
        assert grid == (63 * s,) and kw["WARPS"] == tile.warps and (split != 1 or s == 1)
    # the trials read rotated copies of the weight and its absmax (cold in L2 when timed)
    for name, orig in (("w_ptr", q.weight), ("am_ptr", q.absmax)):
        seen = [a[name] for _, a, _ in trials]
        assert len({t.data_ptr() for t in seen}) == len(seen)
        assert all(torch.equal(t, orig) for t in seen)
        assert launches[-1][1][name] is orig
    # the pick (an unsplit alternative) is what runs, is cached, and is reported
    best_tile, best_split = cands[win]
    assert best_split == 1 and mk._mma_splits(best_tile, 9, 1000, 4096, x.device)[0] > 1
    grid, args, kw = launches[-1]
    assert grid == (63,) and args["N_SPLIT"] == 1 and kw["WARPS"] == best_tile.warps
    assert mk.mma_choice(9, 1000, 4096)[0] == (best_tile, 1)
    assert mk.mma_choice(9, 1000, 4096, split_k=3) is None
    mk._mma(x, q, None, out, 9, 1000, 4096, None, None)             # cached: no new trials
    assert len(launches) == n0 + len(cands) + 2 and launches[-1][0] == (63,)
    # a pinned split_k is its own key, and every trial carries it
    n1 = len(launches)
    mk._mma(x, q, None, out, 9, 1000, 4096, None, 3)
    pinned = launches[n1:]
    assert len(pinned) == len(mk._mma_candidates(9, 1000, 4096, x.device, 3)) + 1
    want = [mk._mma_splits((kw["WARPS"], kw["UNROLL"], 1), 9, 1000, 4096, x.device, 3)[0]
            for _, _, kw in pinned]
    assert [a["N_SPLIT"] for _, a, _ in pinned] == want and 3 in want
    assert len(mk._MMA_BEST) == 2 and mk.mma_choice(9, 1000, 4096, split_k=3) is not None


def test_mma_off_routes_around_the_mma_kernel_and_restores():
    keep = mm.MMA_MAX_M
    with pytest.raises(RuntimeError):
        with mm.mma_off():
            assert mm.MMA_MAX_M == 0
            packed, state, _ = make(64, 256)
            x = torch.randn(1, 256, device=DEV, dtype=torch.bfloat16)
            q = mm._Quant(packed, state.code, state.absmax, 64, 256, 64, state.absmax2,
                          state.code2, state.offset, 256)
            assert not mm._mma_ok(x, q, 1, "auto")
            raise RuntimeError("leave the block by an error")
    assert mm.MMA_MAX_M == keep
