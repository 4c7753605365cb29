"""Why does every quantize kernel stop at ~1.9 TB/s on the H200? Two experiments, one run.

1. Ablation: the quantize step of a one-tile-per-program kernel (``[blocks, words, 8]``, 16-byte
   loads, no layout conversion), with its parts switched on one at a time (STEP):
     0  load, absmax, store absmax and words of raw bits (the traffic alone)
     1  + normalise and the cell index (float->int)     (words from the cell index, no gather)
     2  + a 4-byte gather from a 16-entry table          (gather width 4)
     3  + session 13's 8-byte gather from a 64-entry cell table (floor(16 |s|), sign halves)
     4  cells of round(16 |s|) split by sign, one 8-byte gather from 32 entries
     5  cells of round(16 s) (signed; NF4 only), one 8-byte gather from 32 entries
     6  as 4, two 1-line gathers: float32 threshold and byte codes (FP4's kernel since session 14)
     7  as 5, two 1-line gathers (NF4's kernel for part of session 14)
     8  NF4's count guessed by a cubic, one 1-line gather (NF4's kernel since session 14)
   Steps 3-8 are checked bit for bit. Session 14 on the H200, 4096x14336, 32 blocks x 4 warps,
   steps 0-8: 50.6 / 51.1 / 62.9 / 84.8 / 83.6 / 80.4 / 83.8 / 78.5 / 65.0 us
   (logs/h200_quant_kernel_probe_s14_poly.log).
2. Software pipelining (Triton's ``num_stages``, cp.async) in a persistent loop, STEP 3 (session
   13: 5-10x slower; kept to reproduce the negative result).

A probe, not a library kernel: whole blocks only (n % 64 == 0), NF4, bf16 in. Timed as CUDA-graph
replays over rotated inputs (bench_quant's ``timed``).

    python experiments/quant_kernel_probe.py [--pipeline]
"""
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import replicas, timed  # noqa: E402


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _q4pipe(x_ptr, words_ptr, absmax_ptr, cells_ptr, small_ptr, t32_ptr, g32_ptr, c32_ptr,
            p32_ptr, n, nwords, nblocks, ntiles,
            BS: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
            STEP: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    t = tl.arange(0, BS // 8)
    k = tl.arange(0, 8)
    for tile in tl.range(pid, ntiles, nprog, num_stages=STAGES):
        blk = tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        idx = blk[:, None, None] * BS + t[None, :, None] * 8 + k[None, None, :]
        x = tl.load(x_ptr + idx, mask=(blk < nblocks)[:, None, None], other=0.0).to(tl.float32)
        ax = tl.abs(x).to(tl.int32, bitcast=True)
        am = tl.max(tl.max(ax, axis=2), axis=1).to(tl.float32, bitcast=True)
        amc = tl.where(am < 1e-38, 1e-38, am)
        inv = tl.where(am > 0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amc), 0.0)
        s = x * inv[:, None, None]
        c = ((tl.abs(s) * 16.0).to(tl.int32) + tl.where(s > 0, 32, 0)) & 63
        if STEP == 0:
            q = ax & 15
        elif STEP == 1:
            q = c & 15
        elif STEP == 2:
            q = tl.load(small_ptr + (c & 15))
        elif STEP == 3:
            e = tl.load(cells_ptr + c)
            hw = (e >> 32).to(tl.int32)
            q = tl.where(s > e.to(tl.int32).to(tl.float32, bitcast=True), hw >> 8, hw & 255)
        elif STEP == 8:         # NF4's count guess by a cubic, one 1-line gather
            f = ((-4.25 * s + 0.58) * s + 11.35) * s + 6.63
            g1 = (f + 12582913.0).to(tl.int32, bitcast=True) & 31
            q = tl.where(s > tl.load(p32_ptr + g1), g1, g1 - 1)
        else:
            if STEP % 2 == 0:   # 4, 6: cells of round(16 |s|), split by sign
                r = (tl.abs(s) * 16.0 + 12582912.0).to(tl.int32, bitcast=True) & 31
                c2 = tl.minimum(r, 15) + tl.where(s > 0, 16, 0)
            else:               # 5, 7: cells of round(16 s) (NF4 only)
                r = (s * 16.0 + 12582928.0).to(tl.int32, bitcast=True) & 63
                c2 = tl.minimum(r, 31)
            if STEP < 6:        # one 8-byte gather from 32 entries (2 lines)
                e = tl.load(c32_ptr + c2 + (STEP - 4) * 32)
                hw = (e >> 32).to(tl.int32)
                q = tl.where(s > e.to(tl.int32).to(tl.float32, bitcast=True), hw >> 8, hw & 255)
            else:               # two 1-line gathers: threshold (4 B) and codes (1 B)
                thr = tl.load(t32_ptr + c2 + (STEP - 6) * 32)
                g = tl.load(g32_ptr + c2 + (STEP - 6) * 32).to(tl.int32)
                q = tl.where(s > thr, g >> 4, g & 15)
        wd = tl.reduce(q << ((k ^ 1) * 4)[None, None, :], 2, _or)
        widx = tl.max_contiguous(blk[:, None] * (BS // 8) + t[None, :], [1, 1])
        tl.store(words_ptr + widx, wd, mask=widx < nwords)
        tl.store(absmax_ptr + blk, am, mask=blk < nblocks)


def _floor_cell(v):
    """Session 13's cell: ``floor(16 |s|) + 32 [s > 0]`` (64 entries, 17 used per half)."""
    v = np.asarray(v, dtype=np.float32)
    return ((np.abs(v) * np.float32(16)).astype(np.int32) + np.where(v > 0, 32, 0)) & 63


def _signed_cell(v):
    """Cells of ``round(16 s)`` (32, no sign split: NF4 only): ``min(round(16 s) + 16, 31)``."""
    v = np.asarray(v, dtype=np.float32)
    return np.minimum((v * np.float32(16) + np.float32(12582928.0)).view(np.int32) & 63, 31)


def _packed8(thr, codes, size):
    """One int64 entry per cell: threshold bits | (lo | hi << 8) << 32 (the step-3/4/5 form)."""
    e = torch.zeros(size, dtype=torch.int64)
    lo_hi = (codes & 15).long() | ((codes >> 4).long() << 8)
    e[:len(thr)] = thr.view(torch.int32).long() & 0xFFFFFFFF | lo_hi << 32
    return e


def tables():
    """NF4 tables: the 64-entry floor cells (step 3); split and signed round cells, 8-byte
    entries (steps 4, 5); the same as float thresholds and byte codes (steps 6, 7); the count
    guess's thresholds (step 8)."""
    import peftlab.kernels.quant4bit_tables as q4

    old = _packed8(*q4.cell_table_for("nf4", _floor_cell), 64)
    split = q4.cell_table_for("nf4", q4.cell_np)
    signed = q4.cell_table_for("nf4", _signed_cell)
    c32 = torch.cat([_packed8(*split, 32), _packed8(*signed, 32)])
    t32 = torch.cat([split[0], signed[0]])
    g32 = torch.cat([split[1], signed[1]])
    poly = q4.poly_table("nf4")[1]
    return tuple(t.cuda() for t in (old, c32, t32, g32, poly))


def main() -> None:
    from peftlab.quant import quantize_4bit

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for shape in ((4096, 14336), (28672, 8192)):
        torch.manual_seed(0)
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        n = w.numel()
        nblocks = n // 64
        packed, state = quantize_4bit(w, 64, "nf4", False)
        R = replicas(2 * n, True)
        xs = [w.view(-1)] + [w.view(-1).clone() for _ in range(R - 1)]
        words = torch.empty(n // 8, dtype=torch.int32, device="cuda")
        am = torch.empty(nblocks, device="cuda")
        small = torch.arange(16, dtype=torch.int32, device="cuda")
        cells, c32, t32, g32, p32 = tables()
        moved = 2 * n + n // 2 + 4 * nblocks
        print(f"\n{shape[0]}x{shape[1]} ({R} replicas)")

        def run(rows, stages, step, nprog, warps):
            ntiles = nblocks // rows

            def fn(r):
                _q4pipe[(nprog or ntiles,)](xs[r], words, am, cells, small, t32, g32, c32, p32, n, n // 8, nblocks,
                                            ntiles, BS=64, ROWS=rows, STAGES=stages, STEP=step,
                                            num_warps=warps)
            words.fill_(0)
            fn(0)
            ok = torch.equal(words.view(torch.uint8), packed.view(-1)) and \
                torch.equal(am, state.absmax)
            ms = timed(fn, True, R)[0]
            exact = f"bit-exact {ok}" if step >= 3 else ""
            print(f"  step {step} rows {rows:2d} warps {warps} stages {stages} programs "
                  f"{nprog or ntiles:7d}: {ms * 1e3:7.1f} us {moved / (ms * 1e-3) / 1e12:5.2f} TB/s "
                  f"{exact}")

        for rows, warps in ((16, 4), (32, 4), (32, 8)):
            for step in range(9):
                run(rows, 1, step, 0, warps)
        if "--pipeline" in sys.argv:
            for stages in (1, 3):
                run(32, stages, 3, 8 * sms, 4)


if __name__ == "__main__":
    main()
