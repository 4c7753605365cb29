"""Every float32 through the quantize kernel's coding step, against the nearest-level rule.

The kernel codes a normalised weight ``s`` without searching the 15 decision bounds
(kernels/quant4bit.py): NF4 guesses the count ``#(bounds < s)`` with a cubic and corrects it
by one threshold (``quant4bit_tables.poly_table``), FP4 looks its cell of ``round(16 |s|)`` up
(``cell_tables``).
This script runs the NumPy twins over all 2.13e9 floats in [-1.0001, 1.0001] (the kernel sees
|s| <= 1 + 2 ulps) and counts disagreements with ``order[#(bounds < s)]``; for the guess it
also reports the smallest distance of the cubic from the edges of the band it must stay in
(the unfused float32 evaluation, as NumPy computes it: the GPU may fuse, which moves f by ulps,
far inside that margin). The NF4 cell tables are checked too (a fallback the kernel does not
take for NF4). 2.5-4 minutes per check on one core.

    python experiments/quant_exhaustive_check.py   # session 14: 0 mismatches, margin 0.379
    python experiments/quant_exhaustive_check.py --step 64   # every 64th float, seconds
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.kernels import quant4bit_tables as q4  # noqa: E402
from peftlab.quant.codes import decision_bounds, get_code  # noqa: E402

CHUNK = 1 << 26


def sweep(coder, quant_type: str, step: int):
    """(mismatches, smallest margin or None) of ``coder(s) -> (codes, margin or None)``."""
    b, order = (t.numpy() for t in decision_bounds(get_code(quant_type)))
    lo = int(q4.order_key(np.float32(-1.0001)))
    hi = int(q4.order_key(np.float32(1.0001)))
    bad, margin = 0, None
    for a in range(lo, hi + 1, CHUNK * step):
        s = q4.key_float(np.arange(a, min(a + CHUNK * step, hi + 1), step, dtype=np.int64))
        count = np.searchsorted(b, s, side="left")
        got, m = coder(s, count)
        bad += int((got != order[count]).sum())
        if m is not None:
            margin = m if margin is None else min(margin, m)
    return bad, margin


def nf4_poly(s, count):
    coef, thr = q4.poly_table("nf4")
    b = decision_bounds(get_code("nf4"))[0].numpy()
    return q4.poly_codes(coef, thr.numpy(), s), q4.poly_margin(coef, b, s)


def cells(quant_type):
    thr, codes = (t.numpy() for t in q4.cell_tables(quant_type))

    def coder(s, count):
        c = q4.cell_np(s)
        return np.where(s > thr[c], codes[c] >> 4, codes[c] & 15), None
    return coder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step", type=int, default=1, help="check every step-th float (1: all)")
    ap.add_argument("--only", default="", help="run the checks whose name contains this text")
    args = ap.parse_args(argv)
    failed, ran = 0, 0
    for name, quant_type, coder in (("NF4 count guess", "nf4", nf4_poly),
                                    ("NF4 cells", "nf4", cells("nf4")),
                                    ("FP4 cells", "fp4", cells("fp4"))):
        if args.only.lower() not in name.lower():
            continue
        ran += 1
        t0 = time.time()
        bad, margin = sweep(coder, quant_type, args.step)
        extra = "" if margin is None else f", smallest margin {margin:.3f}"
        print(f"{name}: {bad} mismatches{extra} ({time.time() - t0:.0f} s)", flush=True)
        failed += bad > 0
    if not ran:
        ap.error(f"--only {args.only!r} matches no check")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
