"""A/B of the quantize call: this tree's ``kernels/quant4bit.py`` against another revision's copy.

    git show REV:kernels/quant4bit.py > kernels/_quant4bit_prev.py
    git show REV:kernels/launch.py > kernels/_launch_prev.py   # to compare launch paths too:
    sed -i 's/^from .launch import/from ._launch_prev import/' kernels/_quant4bit_prev.py
    python experiments/quant_ab.py            # on the GPU; delete the two copies after

Session 14 (logs/h200_quant_ab_s14_*.log, against session 13's code): new/old 0.77-0.94 per call
at 4096x4096 .. 8192x8192 (0.88-1.0 at 28672x8192, where the kernels dominate).

Interleaved rounds (A B A B ...) of eager ``quantize_4bit_triton`` calls over rotated inputs
(bench_quant's ``rotated``: the finite check reads back, so no graph), NF4 and FP4 with double
quantization, median per side; bitsandbytes in the same rounds when importable. Both sides are
checked bit for bit against each other first.
"""
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import bitsandbytes_cuda, replicas, rotated  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]


def main() -> None:
    import triton

    new = importlib.import_module("peftlab.kernels.quant4bit")
    old = importlib.import_module("peftlab.kernels._quant4bit_prev")
    bf = bitsandbytes_cuda()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for qt in ("nf4", "fp4"):
        for shape in SHAPES:
            torch.manual_seed(0)
            w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
            R = replicas(2 * w.numel(), True)
            ws = [w] + [w.clone() for _ in range(R - 1)]
            pa, sa = new.quantize_4bit_triton(w, 64, qt, True)
            pb, sb = old.quantize_4bit_triton(w, 64, qt, True)
            same = torch.equal(pa, pb) and torch.equal(sa.absmax, sb.absmax) and \
                torch.equal(sa.state2.absmax, sb.state2.absmax)
            sides = {"new": lambda r: new.quantize_4bit_triton(ws[r], 64, qt, True),
                     "old": lambda r: old.quantize_4bit_triton(ws[r], 64, qt, True)}
            if bf is not None:
                sides["bnb"] = lambda r: bf.quantize_4bit(ws[r], blocksize=64, quant_type=qt,
                                                          compress_statistics=True)
            times = {k: [] for k in sides}
            for _ in range(5):
                for k, fn in sides.items():
                    times[k].append(rotated(fn, R, True) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            line = "  ".join(f"{k} {v:7.1f} us" for k, v in med.items())
            ratio = f"  new/old {med['new'] / med['old']:.3f}"
            if "bnb" in med:
                ratio += f"  bnb/new {med['bnb'] / med['new']:.2f}x  bnb/old {med['bnb'] / med['old']:.2f}x"
            print(f"{qt} {shape[0]}x{shape[1]}: {line}{ratio}  same bits {same}", flush=True)


if __name__ == "__main__":
    main()
