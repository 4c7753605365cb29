"""A/B on the GPU: the ``tile1`` dequantize against ``tile1s`` (the same kernel with its packed
words loaded evict-first and its outputs stored streaming, ``st.global.cs``), issue 5.

NF4 + double quantization, bf16 out, the five Llama shapes; every (variant, elements, warps)
candidate is timed as ``bench_quant`` times dequantize (CUDA-graph replays over replicas of the
inputs, ~3x the L2), in three interleaved rounds, and the outputs are compared bit for bit. The
tuner's own pick (both variants offered) is timed last. Effective TB/s = (bytes read + written) /
time, as in ``bench_quant``.

    python experiments/dequant_stream_ab.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import nbytes, replicas, state_bytes, timed  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]
SIZES = [(2048, 4), (4096, 4), (8192, 8)]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    from peftlab.kernels import quant4bit as q4
    from peftlab.quant import quantize_4bit
    print(f"gpu {torch.cuda.get_device_name()}  torch {torch.__version__}")
    fails = 0
    for N, K in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        moved = nbytes(packed) + state_bytes(st) + 2 * N * K
        R = replicas(moved, True)
        reps = [(packed, st)] + [copy.deepcopy((packed, st)) for _ in range(R - 1)]

        def deq(r):
            return q4.dequantize_4bit_triton(reps[r][0], reps[r][1], torch.bfloat16)
        times = {}
        outs = {}
        for _ in range(3):
            for variant in ("tile1", "tile1s"):
                for elems, warps in SIZES:
                    with q4.forced_variant("dequant", variant, elems, warps):
                        ms, _ = timed(deq, True, R)
                        outs[variant] = deq(0)
                    times.setdefault((variant, elems, warps), []).append(ms)
        same = torch.equal(outs["tile1"].view(torch.int16), outs["tile1s"].view(torch.int16))
        fails += not same
        tuned, _ = timed(deq, True, R)
        best = {}
        for (variant, elems, warps), ts in times.items():
            med = sorted(ts)[1]
            if variant not in best or med < best[variant][0]:
                best[variant] = (med, elems, warps)
        row = "  ".join(f"{v} {moved / (t * 1e-3) / 1e12:.2f} TB/s ({e}x{wp}, rounds "
                        + "/".join(f"{moved / (x * 1e-3) / 1e12:.2f}" for x in times[(v, e, wp)])
                        + ")" for v, (t, e, wp) in best.items())
        print(f"{N:>6}x{K:<6} R={R}  {row}  tuned {moved / (tuned * 1e-3) / 1e12:.2f} TB/s "
              f"({q4.last_choice('dequant')})  bit-identical {same}", flush=True)
        reps = None
        torch.cuda.empty_cache()
    print(f"{fails} shape(s) with differing outputs")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
