"""Can dequantizing a 4-bit weight hide behind cuBLAS at large M? (issue 6, M = 4096 >= 0.95x bf16)

``Linear4bit`` above 128 rows runs ``y = x dequant(W)^T`` as a dequantize (memory-bound, ~41 us for
a 14336x4096 NF4 weight on the H200) followed by a bf16 GEMM (compute-bound, ~640 us at M = 4096):
0.92-0.95x of ``F.linear`` with the bf16 weight, the dequantize being the gap
(``results/h200_kernels.md``). This probe splits W by rows into C chunks and multiplies chunk i
into its column slice of y while chunk i+1 is dequantized on a second stream:

    y[:, r_i : r_{i+1}] = x @ dequant(W[r_i : r_{i+1}])^T,   chunk i on stream i % 2

(a column slice of a row-major y has strides (N, 1): cuBLAS writes it with ldc = N, no copy). A
row range of a 4-bit weight is a prefix-free slice of its packed bytes and block constants
(``row_slice``): rows * K must be a multiple of the blocksize, and with double quantization of
blocksize * 256, so that a chunk's nested groups start at 0.

Methods, timed as CUDA-graph replays (bench_quant's ``timed``; M = 4096, bf16, NF4 + DQ):
``bf16`` (F.linear), ``deq+linear`` (what Linear4bit runs), ``chunked C`` (one stream: the
chunking's own cost) and ``overlap C`` (two streams). Each output is compared with the bf16
``F.linear`` of the dequantized weight first (the same values; a narrower GEMM may sum in
another order, so the difference is reported, not required to be zero).
Whether the GPU overlaps depends on whether the GEMM leaves room on the SMs for the
dequantize's programs; that is what this measures.

    python experiments/linear4bit_overlap_probe.py          # H200: ~1 minute
    python experiments/linear4bit_overlap_probe.py --smoke  # CPU: the slicing, reference path

Written in session 15 (no GPU time left to run it); the next session's first GPU run should.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peftlab.errors import QuantError  # noqa: E402
from peftlab.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from peftlab.quant.state import NestedState, QuantState  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]   # N x K


def row_slice(packed: torch.Tensor, state: QuantState, r0: int, r1: int):
    """``(packed rows r0:r1, their QuantState)`` of a 2-D 4-bit weight, as views (no copy)."""
    N, K = state.shape
    unit = state.blocksize * (state.state2.blocksize if state.nested else 1)
    if not (0 <= r0 < r1 <= N) or (r0 * K) % unit or ((r1 * K) % unit and r1 != N):
        raise QuantError(f"row_slice: rows {r0}:{r1} of a {N}x{K} weight do not start and "
                         f"end on {unit}-element boundaries")
    b0, b1 = r0 * K // state.blocksize, -(-r1 * K // state.blocksize)
    sub = packed[r0 * K // 2: (r1 * K + 1) // 2]
    state2 = None
    if state.nested:
        g0, g1 = b0 // state.state2.blocksize, -(-b1 // state.state2.blocksize)
        state2 = NestedState(state.state2.absmax[g0:g1], state.state2.code,
                             state.state2.blocksize, state.state2.dtype)
    return sub, QuantState(absmax=state.absmax[b0:b1], shape=torch.Size((r1 - r0, K)),
                           dtype=state.dtype, blocksize=state.blocksize,
                           quant_type=state.quant_type, code=state.code, offset=state.offset,
                           state2=state2)


def row_ranges(N: int, K: int, chunks: int, unit: int) -> List[Tuple[int, int]]:
    """``chunks`` row ranges of about equal size, each starting on a ``unit``-element boundary."""
    step = unit // math.gcd(unit, K)               # the fewest rows holding whole units
    per = -(-N // chunks)
    per = -(-per // step) * step
    return [(r, min(N, r + per)) for r in range(0, N, per)]


def chunked_linear(x2, parts, N, streams=None):
    """y [M, N] from ``parts`` = [(r0, r1, packed, state)], chunk i on ``streams[i % 2]``."""
    y = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
    if streams is None:
        for r0, r1, p, s in parts:
            torch.mm(x2, dequantize_4bit(p, s, x2.dtype).t(), out=y[:, r0:r1])
        return y
    main = torch.cuda.current_stream()
    for st in streams:
        st.wait_stream(main)               # x2 and y are ready before either stream starts
    for i, (r0, r1, p, s) in enumerate(parts):
        with torch.cuda.stream(streams[i % 2]):
            torch.mm(x2, dequantize_4bit(p, s, x2.dtype).t(), out=y[:, r0:r1])
    for st in streams:                     # joined before y is used or freed on main
        main.wait_stream(st)
    return y


def smoke() -> int:
    """CPU check of the slicing (reference dequantize): chunked == dequantize-then-matmul."""
    torch.manual_seed(0)
    for N, K, dq in ((96, 512, True), (40, 256, False), (33, 2048, True)):
        w = torch.randn(N, K) * 0.02
        packed, state = quantize_4bit(w, 64, "nf4", dq)
        x = torch.randn(5, K)
        unit = state.blocksize * (256 if dq else 1)
        parts = [(r0, r1, *row_slice(packed, state, r0, r1))
                 for r0, r1 in row_ranges(N, K, 3, unit)]
        assert parts[-1][1] == N and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        full = dequantize_4bit(packed, state)
        for r0, r1, p, s in parts:                          # the slices decode exactly
            assert torch.equal(dequantize_4bit(p, s), full[r0:r1]), (N, K, dq, r0, r1)
        want = x @ full.t()
        got = chunked_linear(x, parts, N)   # a narrower GEMM may sum in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    print("smoke: row slices decode exactly; chunked matches dequantize-then-matmul (CPU)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--m", type=int, default=4096)
    args = ap.parse_args(argv)
    if args.smoke or not torch.cuda.is_available():
        return smoke()
    from bench_quant import timed

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for N, K in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        packed, state = quantize_4bit(w, 64, "nf4", True)
        wd = dequantize_4bit(packed, state)
        x = torch.randn(args.m, K, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, wd)
        methods = {"bf16": lambda: F.linear(x, wd),
                   "deq+linear": lambda: F.linear(x, dequantize_4bit(packed, state))}
        for c in (2, 4):
            parts = [(r0, r1, *row_slice(packed, state, r0, r1))
                     for r0, r1 in row_ranges(N, K, c, 64 * 256)]
            methods[f"chunked {c}"] = lambda parts=parts: chunked_linear(x, parts, N)
            methods[f"overlap {c}"] = lambda parts=parts: chunked_linear(x, parts, N, streams)
        us = {}
        for name, fn in methods.items():
            err = float(((fn().float() - ref.float()).abs().max() / ref.float().abs().max()))
            ms, how = timed(lambda r, fn=fn: fn(), True, 1)
            us[name] = ms * 1e3
            print(f"  {N}x{K} M={args.m} {name:11s} {us[name]:8.1f} us ({how}), max rel. "
                  f"difference to bf16 F.linear {err:.1e}{'  FAIL' if err > 1e-2 else ''}",
                  flush=True)
        print(f"{N}x{K}: vs bf16 " + ", ".join(f"{k} {us['bf16'] / v:.3f}x"
                                             for k, v in us.items() if k != "bf16"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
