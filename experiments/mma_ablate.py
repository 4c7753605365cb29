"""Where the small-M mma kernel's time goes (kernels/matmul4bit_mma.py), issue 6. GPU only.

Runs the kernel with its per-step work (``_compute_step``) replaced, in a fresh process per mode
(Triton resolves the helper when it first compiles the kernel), at M = 1 on rotated weights
(graph replays, as bench_kernels.py), with one tile and no split-K:

    full     the kernel as shipped
    nomma    decode + absmax, the four MMAs replaced by folding the decoded pairs into C
    noabs    decode + MMAs, C added unscaled (no absmax decode: no code2 gather, no FMAs)
    loads    only the loads (words, x, absmax codes, absmax2), folded into one integer
    words    only the weight words (the compiler drops the unused x and absmax loads)
    wabs     the weight words and the absmax codes and absmax2 (no x)

The outputs are garbage except in ``full``; only the times matter. The weights are NF4 with
double quantization (the stand-ins fold the uint8 absmax codes as integers). What each mode costs
relative to ``loads`` is what its work adds to the memory traffic.

    python experiments/mma_ablate.py [--tile 4 2 4 0] [--modes full nomma noabs loads]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peftlab.kernels.decode4bit import decode_pairs  # noqa: E402
from peftlab.kernels.matmul4bit_mma import _absmax_of, _mma4  # noqa: E402

SHAPES = [(4096, 14336), (28672, 8192)]


@triton.jit
def _fold(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7):
    return gw0 ^ gw1 ^ hw0 ^ hw1 ^ x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7


# The stand-ins repeat ``_compute_step``'s parameter list on purpose: the kernel calls them with
# the same positional arguments.
@triton.jit
def _loads(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
           y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
           code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
           acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
           NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr, LUT: tl.constexpr):
    v = _fold(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7) ^ ra_g ^ ra_h
    return acc0 + v.to(tl.float32) + s2_g + s2_h, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _words(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
           y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
           code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
           acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
           NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr, LUT: tl.constexpr):
    v = gw0 ^ gw1 ^ hw0 ^ hw1
    return acc0 + v.to(tl.float32), acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _wabs(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
          y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
          code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
          acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
          NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr, LUT: tl.constexpr):
    v = gw0 ^ gw1 ^ hw0 ^ hw1 ^ ra_g ^ ra_h
    return acc0 + v.to(tl.float32) + s2_g + s2_h, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _pairs_of(gw0, gw1, hw0, hw1, t0, t1, t2, t3, t4, t5, t6, t7):
    g0, g1, g2, g3 = decode_pairs(gw0, t0, t1, t2, t3, t4, t5, t6, t7)
    g4, g5, g6, g7 = decode_pairs(gw1, t0, t1, t2, t3, t4, t5, t6, t7)
    h0, h1, h2, h3 = decode_pairs(hw0, t0, t1, t2, t3, t4, t5, t6, t7)
    h4, h5, h6, h7 = decode_pairs(hw1, t0, t1, t2, t3, t4, t5, t6, t7)
    return g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7


@triton.jit
def _nomma(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
           y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
           code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
           acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
           NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr, LUT: tl.constexpr):
    a_g = _absmax_of(ra_g, s2_g, code2_ptr, off, NESTED)
    a_h = _absmax_of(ra_h, s2_h, code2_ptr, off, NESTED)
    g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7 = _pairs_of(
        gw0, gw1, hw0, hw1, t0, t1, t2, t3, t4, t5, t6, t7)
    v = g0 ^ g1 ^ g2 ^ g3 ^ g4 ^ g5 ^ g6 ^ g7 ^ _fold(h0, h1, h2, h3, h4, h5, h6, h7,
                                                      x0, x1, x2, x3)
    v = v ^ x4 ^ x5 ^ x6 ^ x7
    return acc0 + v.to(tl.float32) * a_g, acc1, acc2 + a_h, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _noabs(gw0, gw1, hw0, hw1, x0, x1, x2, x3, x4, x5, x6, x7,
           y0, y1, y2, y3, y4, y5, y6, y7, ra_g, ra_h, s2_g, s2_h,
           code2_ptr, off, t0, t1, t2, t3, t4, t5, t6, t7,
           acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
           NESTED: tl.constexpr, IS_BF16: tl.constexpr, NCOL: tl.constexpr, LUT: tl.constexpr):
    g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7 = _pairs_of(
        gw0, gw1, hw0, hw1, t0, t1, t2, t3, t4, t5, t6, t7)
    d0, d1, d2, d3 = _mma4(g0, g1, g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7,
                           x0, x1, x2, x3, x4, x5, x6, x7, IS_BF16)
    r = (ra_g ^ ra_h).to(tl.float32) + s2_g + s2_h
    return acc0 + d0 + r, acc1 + d1, acc2 + d2, acc3 + d3, acc4, acc5, acc6, acc7


STAND_INS = {"loads": _loads, "words": _words, "wabs": _wabs, "nomma": _nomma,
             "noabs": _noabs}
MODES = ["full"] + list(STAND_INS)


def one_mode(mode: str, tile) -> None:
    from bench_quant import nbytes, timed
    from mma_probe import rotated_weights
    from peftlab.kernels import matmul4bit as mm
    from peftlab.kernels import matmul4bit_mma as mk
    from peftlab.quant import quantize_4bit
    if mode != "full":
        mk._compute_step = STAND_INS[mode]
    for N, K in SHAPES:
        reps = [r[1:] for r in rotated_weights(quantize_4bit, N, K)]
        R = len(reps)
        packed, st = reps[0]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)

        def f(r):
            p, q = reps[r]
            return mm.matmul4bit_forward(x, p, q.code, q.absmax, N, K, 64, absmax2=q.absmax2,
                                         code2=q.code2, offset=q.offset, split_k=1,
                                         config=("mma",) + tuple(tile))
        t, _ = timed(f, True, R)
        wb = nbytes(packed, st.absmax)
        print(f"{mode:>6} {N:>6}x{K:<6} tile {tuple(tile)}: {t * 1e3:7.1f} us, "
              f"{wb / t / 1e9:5.2f} TB/s of weight", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tile", type=int, nargs="+", default=[4, 2, 4, 0])
    p.add_argument("--modes", nargs="+", default=["full", "nomma", "noabs", "loads"],
                   choices=MODES)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    tile = [int(args.tile[0]), int(args.tile[1]), int(args.tile[2])] + [
        bool(v) for v in args.tile[3:]]
    if args.one:
        one_mode(args.one, tile)
        return 0
    rc = 0
    for mode in args.modes:
        rc |= subprocess.call([sys.executable, __file__, "--one", mode, "--tile",
                               *map(str, args.tile)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
