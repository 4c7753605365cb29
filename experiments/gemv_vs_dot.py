"""Small-M 4-bit matmul: the CUDA-core GEMV kernel vs the split-K tensor-core kernel, A/B.

``matmul_4bit`` sends M <= ``GEMV_MAX_M`` rows to ``_mm4_gemv_kernel`` and larger M to the
tiled tensor-core kernel; this script times both on the same inputs (NF4 + double quant, bf16,
blocksize 64), for M in 1, 2, 4, 8 and three Llama shapes, with bench_kernels' method (CUDA graph
replays, inputs rotated over replicas, do_bench median), next to bf16 ``F.linear``, and prints
which path wins where: the evidence for ``GEMV_MAX_M``.

    python experiments/gemv_vs_dot.py        # H200: ~1 minute
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import nbytes, replicas, timed  # noqa: E402
from peftlab.kernels import matmul4bit as mm  # noqa: E402
from peftlab.quant import quantize_4bit  # noqa: E402


def main():
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}  torch {torch.__version__}")
    print(f"{'shape':12s} {'M':>2s} {'bf16_us':>8s} {'gemv_us':>8s} {'dot_us':>8s}  "
          f"{'gemv/bf16':>9s} {'dot/bf16':>8s}  winner")
    default = mm.GEMV_MAX_M
    for N, K in ((4096, 4096), (4096, 14336), (28672, 8192)):
        w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        R = replicas(nbytes(packed), True)
        reps = [(w, packed, state)] + [copy.deepcopy((w, packed, state)) for _ in range(R - 1)]
        for M in (1, 2, 4, 8):
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(R)]
            bf16, _ = timed(lambda r: F.linear(xs[r], reps[r][0]), True, R)
            res = {}
            for name, limit in (("gemv", 8), ("dot", 0)):
                mm.GEMV_MAX_M = limit
                try:
                    res[name], _ = timed(lambda r: mm.matmul_4bit(xs[r], reps[r][1], reps[r][2]),
                                         True, R)
                finally:
                    mm.GEMV_MAX_M = default
            outs = {}
            for name, limit in (("gemv", 8), ("dot", 0)):   # the two paths agree?
                mm.GEMV_MAX_M = limit
                try:
                    outs[name] = mm.matmul_4bit(xs[0], reps[0][1], reps[0][2]).float()
                finally:
                    mm.GEMV_MAX_M = default
            err = float((outs["gemv"] - outs["dot"]).norm() / outs["dot"].norm())
            win = min(res, key=res.get)
            tile = (mm.gemv_choice(M, N, K) or ("?",))[0]
            print(f"{N}x{K:<7d} {M:2d} {bf16 * 1e3:8.1f} {res['gemv'] * 1e3:8.1f} "
                  f"{res['dot'] * 1e3:8.1f}  {bf16 / res['gemv']:8.2f}x {bf16 / res['dot']:7.2f}x"
                  f"  {win:5s} rel.diff {err:.1e}  gemv tile {tile}")
        reps = w = packed = state = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
