"""The quantize kernel's lookup tables, built and checked on the host in NumPy.

``kernels/quant4bit.py``'s ``_quant4_kernel`` codes a normalised weight s in [-1, 1] (the block's
values times the reciprocal of its absmax) as ``order[#(bounds < s)]``, the nearest level with ties
to the lower one (QLoRA, arXiv 2305.14314, section 3; ``peftlab/quant/functional.py``), without
searching the 15 decision bounds, because gathers from L1 are what the kernel spends its time on
(one gather per weight costs about a quarter of the weight's memory traffic on an H200):

* NF4, a count guess (``poly_table``): the staircase q(s) = #(bounds < s) follows the normal CDF,
  so a cubic f fitted to the line through (bound_k, k) keeps g = round(f(s)) at q or q - 1 for
  every float32 s in [-1.0001, 1.0001] (f stays 0.379 or more inside (q - 1.5, q + 0.5)); one
  comparison settles it, q = g + [s > bounds[g]], from a 32-entry table t = [-inf, bounds,
  +inf ...] read at g + 1. Only the margin matters, not f's last bits, so fused or unfused
  arithmetic, GPU or NumPy, give the same codes.
* FP4, cells (``cell_tables``): its bounds -1/384, 0, 1/384 are closer than a cubic can follow.
  The cell of s is ``min(round(16 |s|), 15) + 16 [s > 0]`` (32 cells; split by sign, s <= 0
  never passes the bound 0 and s > 0 always does); over one cell the count steps at most once,
  so the cell's step bound t and its codes ``lo | hi << 4`` give ``s > t ? hi : lo``.

Both round by adding ``MAGIC`` = 1.5 * 2**23 (where the float ulp is 1, so the integer lands in
the low bits of the float's pattern: no float-to-int conversion). ``cell_runs`` finds every run
of floats that shares a cell by bisection over the floats' order (``order_key``/``key_float``),
so the tables are built from the exact float32 cell edges. All 2.13e9 floats of [-1.0001,
1.0001] were checked against the bounds (``experiments/quant_exhaustive_check.py``: 0
mismatches); the NumPy twins here (``cell_np``, ``poly_codes``) are what the tests compare.
"""
from __future__ import annotations

import numpy as np
import torch

from peftlab.quant.codes import decision_bounds, get_code

# 1.5 * 2**23: in [2**23, 2**24) the float ulp is 1, so x + MAGIC rounds x to an integer held
# in the low bits of its float32 pattern
MAGIC = 12582912.0


def cell_np(s: np.ndarray) -> np.ndarray:
    """The kernel's cell of normalised values ``s``, ``min(round(16 |s|), 15) + 16 [s > 0]``
    (float32 arithmetic, NumPy twin; round half to even: ``16 |s|`` is exact and adding
    ``MAGIC`` rounds once)."""
    s = np.asarray(s, dtype=np.float32)
    r = (np.abs(s) * np.float32(16) + np.float32(MAGIC)).view(np.int32) & 31
    return np.minimum(r, 15) + np.where(s > 0, 16, 0)


def order_key(s):
    """float32 -> int64 key in the floats' order (-0.0 just below +0.0)."""
    u = np.asarray(s, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(u < 0, -(2 ** 31) - 1 - u, u)


def key_float(k):
    """The inverse of ``order_key``: int64 keys -> float32."""
    k = np.asarray(k, dtype=np.int64)
    u = np.where(k < 0, -(2 ** 31) - 1 - k, k)
    return (u & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def cell_runs(cell, lim: float = 1.0001):
    """``[(cell, first key, last key)]``: the runs of equal cells over every float32 in
    ``[-lim, lim]`` (|s| <= 1 + 2 ulps in the kernel), by bisection between 2**16 sampled keys
    (cells are thousands of floats wide; the cell table rejects a cell met in two runs)."""
    lo_k, hi_k = int(order_key(np.float32(-lim))), int(order_key(np.float32(lim)))
    ks = np.unique(np.linspace(lo_k, hi_k, 1 << 16).astype(np.int64))
    cs = cell(key_float(ks))
    at = lambda k: int(cell(key_float(k)))  # noqa: E731
    edges = []
    for i in np.nonzero(cs[1:] != cs[:-1])[0]:
        a, end = int(ks[i]), int(ks[i + 1])
        while at(end) != at(a):                  # a change in (a, end]: find where
            lo, hi = a, end
            while hi - lo > 1:
                m = (lo + hi) // 2
                lo, hi = (m, hi) if at(m) == at(a) else (lo, m)
            edges.append(hi)
            a = hi
    starts, ends = [lo_k] + edges, [e - 1 for e in edges] + [hi_k]
    return [(at(a), a, e) for a, e in zip(starts, ends)]


def cell_tables(quant_type: str):
    """``(thresholds float32 [32], codes uint8 [32])``: the lookup by the sign-split cells of
    ``cell_np`` (``cell_table_for``). Cells of ``round(16 s)`` without the split would save two
    instructions but fail FP4, whose three bounds around 0 (-1/384, 0, 1/384) share a cell: split,
    s <= 0 never passes the bound 0 and s > 0 always does."""
    return cell_table_for(quant_type, cell_np)


# NF4's count guess (the kernel's CODING 1): f(s) = ((C3 s + C2) s + C1) s + C0 stays 0.379 or
# more inside (#(bounds < s) - 1.5, #(bounds < s) + 0.5) for every s in [-1.0001, 1.0001]
# (a cubic follows the normal-quantile staircase; fitted to the line through (bound_k, k))
POLY = {"nf4": (-4.25, 0.58, 11.35, 6.63)}


def poly_table(quant_type: str):
    """``(coefficients, thresholds float32 [32])`` for the kernel's CODING 1 (poly), or None.

    The count of bounds below ``s``, q = #(bounds < s), is what the code is (NF4's order is the
    identity). ``g = round(f(s))`` is q or q - 1, so ``q = g + [s > bounds[g]]``: one gather from
    ``t[g + 1]`` (t = [-inf, bounds, +inf ...], 128 B) instead of a cell's threshold and codes.
    Exactness needs only the margin, not f's last bits (fused or not, GPU or NumPy): checked
    here on a dense grid and at every bound +-2 ulps (at least 0.25 required), and over all
    2.13e9 floats in [-1.0001, 1.0001] by ``experiments/quant_exhaustive_check.py`` (0
    mismatches, margin 0.379). FP4 has no such path: its bounds around 0 (-1/384, 0, 1/384) are
    closer than a cubic can follow; a guess of the magnitude's rank with the sign apart was
    exact (margin 0.39) but its extra integer work made the kernel compute-bound, 143 us
    against the cells' 82 us at 4096x14336 (``logs/h200_quant_coding_paths_s14.log``)."""
    coef = POLY.get(quant_type)
    if coef is None:
        return None
    bounds, order = decision_bounds(get_code(quant_type))
    if not torch.equal(order, torch.arange(len(order))):
        raise RuntimeError(f"{quant_type}: the poly coding emits the count, so the code's order "
                           f"must be the identity")
    b = bounds.numpy()
    near = [b]
    for d in (np.inf, -np.inf):
        x = b
        for _ in range(2):
            x = np.nextafter(x, np.float32(d))
            near.append(x)
    s = np.concatenate([np.linspace(-1.0001, 1.0001, 1 << 18, dtype=np.float32)] + near)
    margin = poly_margin(coef, b, s)
    if margin < 0.25:
        raise RuntimeError(f"{quant_type}: the count guess leaves a margin of {margin:.3f}")
    thr = np.full(32, np.inf, dtype=np.float32)
    thr[0], thr[1:1 + len(b)] = -np.inf, b
    return coef, torch.from_numpy(thr)


def poly_guess(coef, s: np.ndarray) -> np.ndarray:
    """f(s) of the poly coding (NumPy, float32, unfused)."""
    s = np.asarray(s, dtype=np.float32)
    c3, c2, c1, c0 = (np.float32(c) for c in coef)
    return ((c3 * s + c2) * s + c1) * s + c0


def poly_margin(coef, b: np.ndarray, s: np.ndarray) -> float:
    """Smallest distance of f from the edges of its band over ``s``: round(f) must be
    #(b < s) or one less."""
    count = np.searchsorted(b, s, side="left")
    f = poly_guess(coef, s)
    return float(np.minimum(f - (count - 1.5), (count + 0.5) - f).min())


def poly_codes(coef, thr: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The kernel's poly coding in NumPy (float32): codes of normalised values ``s``."""
    s = np.asarray(s, dtype=np.float32)
    g1 = (poly_guess(coef, s) + np.float32(MAGIC + 1)).view(np.int32) & 31
    return np.where(s > thr[g1], g1, g1 - 1)


def cell_table_for(quant_type: str, cell):
    """``(thresholds float32 [C], codes uint8 [C])`` for the cell function ``cell`` (float32
    ``s`` -> the kernel's cell index, NumPy). Over the floats of one cell ``#(bounds < s)`` takes
    at most two values: the entry holds the bound ``t`` where it steps (+inf if it does not) and
    the codes ``lo | hi << 4`` (FP4's order applied): the kernel emits ``s > t ? hi : lo``,
    exactly ``order[#(bounds < s)]``. Raises RuntimeError if a cell is not one run of floats or
    holds two steps."""
    bounds, order = decision_bounds(get_code(quant_type))
    b, order = bounds.numpy(), order.numpy()
    runs = cell_runs(cell)
    size = 1 + max(c for c, _, _ in runs)
    thr, codes, seen = np.full(size, np.inf, dtype=np.float32), np.zeros(size, np.uint8), set()
    for c, first, last in runs:
        lo, hi = (int((b < key_float(k)).sum()) for k in (first, last))
        if c in seen or hi - lo > 1:
            raise RuntimeError(f"{quant_type}: cell {c} is split or holds {hi - lo} steps")
        seen.add(c)
        thr[c] = b[lo] if hi > lo else np.inf
        codes[c] = int(order[lo]) | int(order[hi]) << 4
    return torch.from_numpy(thr), torch.from_numpy(codes)
