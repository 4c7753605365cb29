"""Probe for the small-M mma.sync 4-bit matmul (kernels/matmul4bit_mma.py), issue 6. GPU only.

1. Correctness: ``matmul4bit_forward`` through the mma kernel (every tile of MMA_CONFIGS that
   fits, plus the tuned pick) against a float64 dequantize-then-matmul, into NaN-poisoned
   outputs: M = 1, 3, 8, 9, 16; N not a multiple of the 64-row tile; bf16 and fp16; NF4 and FP4;
   with and without double quantization and bias; blocksize 64 and 128; a pinned split-K.
2. Speed (CUDA graphs, inputs rotated through ~3x L2, as bench_kernels.py): torch bf16
   ``F.linear``, the mma kernel (tuned; every candidate's time printed), and the ``tl.dot``
   split-K kernel it replaces (``matmul4bit.mma_off``), at M = 1 and 16 on the five Llama shapes.

3. ``--sweep``: every tile x pinned split-K (``--splits``, 0 = the tile's own sizing) at M = 1
   and 16 on the five shapes, rotated inputs, next to the tuner's pick (session 17's sweeps:
   ``results/logs/h200_mma_sweep_s17*.log``).

4. ``--extra W,U,P[,LUT] ...``: tiles added to MMA_CONFIGS for the run (checked, swept and
   offered to the tuner): session 18 timed its cp.async and repacked variants this way.

    python experiments/mma_probe.py [--no-check] [--no-speed] [--sweep [--splits 0 1 2 ...]]
                                    [--extra 8,1,2 ...]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import nbytes, replicas, timed  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]


def _raw(state):
    return dict(absmax2=state.absmax2, code2=state.code2, offset=state.offset,
                blocksize2=state.blocksize2 or 256)


def tile_name(mk, tile) -> str:
    """A tile of MMA_CONFIGS as text, without a split: ``w4 u2 p4``."""
    return mk.mma_describe((tile, None)).rsplit(" split", 1)[0]


def rotated_weights(quantize, N: int, K: int):
    """A Gaussian bf16 weight [N, K] (seed 0) and its NF4 + double-quant replicas, together about
    3x the L2 (``bench_quant.replicas``): [(w, packed, state), ...]."""
    torch.manual_seed(0)
    w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    packed, st = quantize(w, blocksize=64, quant_type="nf4", double_quant=True)
    R = replicas(nbytes(packed), True)
    return [(w, packed, st)] + [copy.deepcopy((w, packed, st)) for _ in range(R - 1)]


def check(mm, mk, quantize, deq_ref) -> int:
    """Print one line per case; return the number of failures."""
    fails = 0
    cases = []
    for (N, K) in [(1000, 4096), (4096, 1024)]:
        for M in (1, 3, 8, 9, 16):
            cases.append((N, K, M, torch.bfloat16, "nf4", True, M == 3, 64, None))
    cases += [(520, 2048, 1, torch.float16, "nf4", True, False, 64, None),
              (520, 2048, 16, torch.float16, "fp4", True, True, 64, None),
              (520, 2048, 5, torch.bfloat16, "fp4", False, False, 64, None),
              (520, 2048, 12, torch.bfloat16, "nf4", False, True, 128, None),
              (768, 4096, 2, torch.bfloat16, "nf4", True, False, 256, None),
              (4096, 4096, 1, torch.bfloat16, "nf4", True, False, 64, 3)]
    for N, K, M, dt, qt, dq, has_bias, bs, split in cases:
        torch.manual_seed(N + K + M)
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        packed, st = quantize(w, blocksize=bs, quant_type=qt, double_quant=dq)
        W = deq_ref(packed, st, torch.float32).double()
        x = torch.randn(M, K, device="cuda", dtype=dt)
        bias = torch.randn(N, device="cuda", dtype=dt) if has_bias else None
        ref = x.double() @ W.T + (0 if bias is None else bias.double())
        cfgs = [None] + [("mma",) + c for c in mk.MMA_CONFIGS if K % c.chunk() == 0]
        errs = []
        for cfg in cfgs:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
            y = mm.matmul4bit_forward(x, packed, st.code, st.absmax, N, K, bs, bias=bias,
                                      out=out, config=cfg, split_k=split, **_raw(st))
            y = y.double()
            err = float("inf") if not torch.isfinite(y).all() else float(
                (y - ref).norm() / ref.norm())
            errs.append(err)
        tol = 1e-2 if dt == torch.bfloat16 else 3e-3
        ok = max(errs) < tol
        fails += not ok
        print(f"  {N}x{K} M={M} {str(dt)[6:]} {qt}{'+dq' if dq else ''} bs={bs} "
              f"bias={has_bias} split={split}: max rel err {max(errs):.2e} over "
              f"{len(errs)} tiles {'PASS' if ok else 'FAIL'}")
    return fails


def speed(mm, mk, quantize) -> None:
    print(f"{'shape':>12} {'M':>3} {'bf16 us':>8} {'mma us':>8} {'dot us':>8} "
          f"{'mma/bf16':>9} {'dot/bf16':>9}  mma tile; candidates (us, graph replays, "
          f"weight copies rotated)")
    for N, K in SHAPES:
        reps = rotated_weights(quantize, N, K)
        R = len(reps)
        for M in (1, 16):
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(R)]

            def ours(r):
                return mm.matmul_4bit(xs[r], reps[r][1], reps[r][2])

            def dot(r):
                with mm.mma_off():
                    return mm.matmul_4bit(xs[r], reps[r][1], reps[r][2])
            t_bf, _ = timed(lambda r: F.linear(xs[r], reps[r][0]), True, R)
            t_mma, _ = timed(ours, True, R)
            t_dot, _ = timed(dot, True, R)
            d = (ours(0).double() - dot(0).double()).norm() / dot(0).double().norm()
            tile, cands = mk.mma_choice(M, N, K) or ("?", [])
            tile = mk.mma_describe(tile)
            print(f"{N:>6}x{K:<6} {M:>3} {t_bf * 1e3:8.1f} {t_mma * 1e3:8.1f} {t_dot * 1e3:8.1f} "
                  f"{t_bf / t_mma:8.2f}x {t_bf / t_dot:8.2f}x  {tile}; "
                  + ", ".join(f"{mk.mma_describe(c)} {t * 1e3:.1f}" for c, t in cands)
                  + f"; |mma-dot|/|dot| {d:.1e}")
        reps = xs = None
        torch.cuda.empty_cache()


def sweep(mm, mk, quantize, deq_ref, splits=(1, 2, 3, 4, 6, 8, 12)) -> None:
    """Every tile of MMA_CONFIGS x pinned split-K at M = 1 and 16 (rotated inputs: cold L2).
    (Session 17 also swept tiles that load x when a step runs instead of with the weights, one
    step ahead: they lost, ``results/logs/h200_mma_sweep_s17_xahead.log``.)"""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = list(mk.MMA_CONFIGS)
    print(f"sweep: us per call, graph replays, rotated; {sms} SMs; columns = split_k {splits}")
    for N, K in SHAPES:
        reps = [r[1:] for r in rotated_weights(quantize, N, K)]
        R = len(reps)
        packed, st = reps[0]
        for M in (1, 16):
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
            ref = xs[0].double() @ deq_ref(packed, st, torch.float32).double().T
            best = mm.matmul_4bit  # the tuner's pick (its timing rotates weight copies)
            t_auto, _ = timed(lambda r: best(xs[r], reps[r][0], reps[r][1]), True, R)
            pick = mk.mma_choice(M, N, K)
            print(f"{N:>6}x{K:<6} M={M:<2} tuned {t_auto * 1e3:6.1f} "
                  f"{mk.mma_describe(pick[0]) if pick else '(untuned)'}", flush=True)
            for tile in tiles:
                if K % tile.chunk():
                    continue
                row = []
                for s in splits:
                    cfg = ("mma",) + tuple(tile)

                    def f(r, cfg=cfg, s=s):
                        p, q = reps[r]
                        return mm.matmul4bit_forward(xs[r], p, q.code, q.absmax, N, K, 64,
                                                     split_k=s, config=cfg, **_raw(q))
                    y = f(0).double()
                    err = float((y - ref).norm() / ref.norm())
                    t, _ = timed(f, True, R)
                    row.append(f"{t * 1e3:6.1f}" + ("" if err < 1e-2 else f"!ERR {err:.1e}"))
                print(f"    {tile_name(mk, tile):<14} " + " ".join(row), flush=True)
        reps = xs = None
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--sweep", action="store_true", help="every tile x pinned split-K")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12],
                   help="the sweep's split-K values (0: the tile's own sizing)")
    p.add_argument("--extra", nargs="+", default=[], metavar="W,U,P[,LUT]",
                   help="tiles added to MMA_CONFIGS for this run (checked, swept, offered to "
                        "the tuner), e.g. 8,1,2 or 4,2,4,1")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    from peftlab.kernels import matmul4bit as mm
    from peftlab.kernels import matmul4bit_mma as mk
    from peftlab.quant import dequantize_4bit_reference, quantize_4bit
    for spec in args.extra:
        mk.MMA_CONFIGS.append(mk.MmaTile(*(int(v) for v in spec.split(","))))
    print(f"gpu {torch.cuda.get_device_name()}  torch {torch.__version__}  tiles "
          + " ".join(tile_name(mk, c) for c in mk.MMA_CONFIGS))
    fails = 0 if args.no_check else check(mm, mk, quantize_4bit, dequantize_4bit_reference)
    print(f"correctness: {fails} failing case(s)")
    if args.sweep:
        sweep(mm, mk, quantize_4bit, dequantize_4bit_reference,
              tuple(s or None for s in args.splits))
    if not args.no_speed:
        speed(mm, mk, quantize_4bit)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
