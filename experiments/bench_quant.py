"""Benchmark of the 4-bit Triton kernels (peftlab/kernels/quant4bit.py) against bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) dequantizes every 4-bit weight on every
forward and backward pass, so dequantization speed is bandwidth: per bf16 weight it reads half a
byte (plus the absmax codes) and writes two. For the weight shapes of Llama-class models
(4096x4096 .. 28672x8192, bf16) this script times, with ``triton.testing.do_bench`` (median of
repetitions, warm-up excluded, L2 flushed before each repetition; inputs rotated over replicas
that together are ~3x the L2 size, time divided by the replica count, so the write-back of the
flushed L2's dirty lines is not charged to one call):

  dequant   ours and bitsandbytes' (when it imports with CUDA): NF4/FP4, double quant on/off,
            bf16 output; effective TB/s = (bytes read + bytes written) / time. Timed twice:
            launched from Python (``ms``: at the middle sizes this is the host's time to issue
            the call, for bitsandbytes too, and it varies between machines) and as CUDA-graph
            replays of the same rotated calls (``graph_ms``: the GPU's time, see ``timed``).
            Target: >= 3.6 TB/s for NF4 + double quant (bitsandbytes: about 2 TB/s).
  quant     ours and bitsandbytes': NF4/FP4 with double quant, bf16 input.
            Target: 4096x14336 at least 5x faster than bitsandbytes (0.69 ms).
  copy      a device-to-device copy of the bf16 weight: the bandwidth ceiling.
  check     at every size, bit-exactness of ours (Triton) vs our PyTorch reference (must be 0
            mismatches) and vs bitsandbytes' CUDA kernels (packed bytes, absmax codes, nested
            absmax, dequantized bits). Known, documented differences from bitsandbytes' CUDA
            kernel (peftlab/quant/functional.py): FP4 values within 1/384 of zero (sign of the
            zero code), values within an ulp of its rounded thresholds, ragged last blocks,
            exact ties of the nested 8-bit search.

    python experiments/bench_quant.py --out experiments/results     # H200: < 2 minutes
    python experiments/bench_quant.py --smoke                        # CPU: tiny shapes, interpreted

Prints one table (GPU name, torch / triton / bitsandbytes versions, date; ``config`` is the
kernel variant and tile the tuner picked for our row: dequantize ``tile1`` / ``tile`` / ``bytes``,
quantize ``words`` / ``words1`` / ``bytes``, elements per program, warps; see
kernels/quant4bit.py), the tuner's winner per key, and writes bench_quant.csv and
bench_quant_check.csv (``*_smoke.csv`` with --smoke) under --out.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]
SMOKE_SHAPES = [(64, 128), (33, 130)]
VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def lib_versions() -> Dict[str, str]:
    found = {"torch": torch.__version__}
    for mod_name in ("triton", "bitsandbytes"):
        try:
            found[mod_name] = __import__(mod_name).__version__
        except Exception as e:  # noqa: BLE001 - any import failure just means "not available"
            found[mod_name] = f"n/a ({type(e).__name__})"
    return found


def bitsandbytes_cuda():
    """bitsandbytes.functional if it imports and has a CUDA backend, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        import bitsandbytes.functional as bf

        probe = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        bf.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        return bf
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes unavailable on CUDA: {type(e).__name__}: {e}")
        return None


def timer(fn: Callable[[], object], cuda: bool) -> float:
    """Median milliseconds of ``fn``; do_bench on CUDA (L2 flushed), perf_counter on CPU."""
    fn()  # compile / autotune outside the timed region
    if cuda:
        import triton.testing

        torch.cuda.synchronize()

        try:
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        except TypeError:  # older triton: no return_mode
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5]))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def replicas(footprint_bytes: int, cuda: bool) -> int:
    """Input replicas per timed unit: together about 3x the L2 cache (at least 2, at most 32)."""
    if not cuda:
        return 1
    from peftlab.kernels.tuning import l2_copies
    return l2_copies(footprint_bytes, "cuda:0", 3, 2, 32)


def rotated(fn: Callable[[int], object], reps: int, cuda: bool) -> float:
    """Median ms per call of ``fn(r)`` timed as units of calls on replicas r = 0..reps-1: no call
    finds its inputs in L2, and the write-back of the dirty lines that do_bench's L2 flush leaves
    behind is shared by ``reps`` calls instead of charged to the first."""
    def unit():
        for r in range(reps):
            fn(r)

    return timer(unit, cuda) / reps


def timed(fn: Callable[[int], object], cuda: bool, reps: int):
    """(median ms per call, how). ``fn(r)`` computes on replica r of the inputs; one timed unit
    calls it on replicas 0..reps-1 in turn, so no call finds its weight in L2 (the replicas
    together are a few times the L2 size) and the L2 flush before each unit, whose dirty lines
    are written back during the first call, is shared by ``reps`` calls instead of charged to
    one. On CUDA the unit is captured once into a CUDA graph and its replays are timed with
    do_bench: no method's host-side launch overhead leaks into the GPU time. Methods that cannot
    be captured run eagerly (``rotated``)."""
    if not cuda:
        return rotated(fn, reps, cuda), "cpu"

    def unit():
        for r in range(reps):
            fn(r)

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):         # warm-up: per-stream buffers, no autotuning
            unit()
            unit()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            unit()
        ms = timer(graph.replay, cuda) / reps
        del graph
        return ms, "graph"
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize()
        return rotated(fn, reps, cuda), "eager"


def nbytes(*tensors) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            total += t.numel() * t.element_size()
    return total


def state_bytes(state) -> int:
    extra = (state.offset, state.state2.absmax, state.state2.code) if state.nested else ()
    return nbytes(state.absmax, state.code, *extra)


def mismatches(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> int:
    if a is None or b is None:
        return -1
    if a.shape != b.shape or a.dtype != b.dtype:
        return a.numel()
    if a.dtype.is_floating_point:
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(view), b.view(view)
    return int((a != b).sum())


def bench_shape(shape, device, cuda, bf, rows, checks, ops):
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
    n = w.numel()
    name = f"{shape[0]}x{shape[1]}"

    def add(op, qt, dq, impl, ms, moved, bnb_ms=None, graph=None, bnb_graph=None):
        config = ops["choice"](op) if impl == "peftlab" else ""  # what the timed call ran
        g_ms, how = graph if graph else (None, "")
        rows.append(dict(shape=name, op=op, quant_type=qt, double_quant=dq, impl=impl,
                         ms=round(ms, 5), gbytes=round(moved / 1e9, 4),
                         tbps=round(moved / (ms * 1e-3) / 1e12, 3),
                         speedup_vs_bnb="" if bnb_ms is None else round(bnb_ms / ms, 2),
                         graph_ms="" if how != "graph" else round(g_ms, 5),
                         graph_tbps="" if how != "graph" else round(moved / (g_ms * 1e-3) / 1e12, 3),
                         graph_speedup_vs_bnb="" if how != "graph" or not bnb_graph
                         or bnb_graph[1] != "graph" else round(bnb_graph[0] / g_ms, 2),
                         config=config))

    # inputs rotate over R replicas (see ``rotated``): R_w for the bf16 weight, R_q for 4-bit
    R_w = replicas(2 * nbytes(w), cuda)
    ws = [w] + [w.clone() for _ in range(R_w - 1)]
    dsts = [torch.empty_like(w) for _ in range(R_w)]
    add("copy", "", "", "torch", rotated(lambda r: dsts[r].copy_(ws[r]), R_w, cuda), 2 * nbytes(w))
    dsts = None
    for qt, dq in VARIANTS:
        packed, state = ops["quantize"](w, 64, qt, dq)
        moved = nbytes(packed) + state_bytes(state) + 2 * n
        R_q = replicas(moved, cuda)
        reps = [(packed, state)] + [copy.deepcopy((packed, state)) for _ in range(R_q - 1)]
        bnb_ms = bnb_graph = None
        if bf is not None:
            b_packed, b_state = bf.quantize_4bit(w, blocksize=64, quant_type=qt,
                                                 compress_statistics=dq)
            b_reps = [(b_packed, b_state)] + [copy.deepcopy((b_packed, b_state))
                                              for _ in range(R_q - 1)]
            bnb_ms = rotated(lambda r: bf.dequantize_4bit(*b_reps[r]), R_q, cuda)
            bnb_graph = timed(lambda r: bf.dequantize_4bit(*b_reps[r]), cuda, R_q)
            add("dequant", qt, dq, "bitsandbytes", bnb_ms, moved, graph=bnb_graph)
            del b_reps
        ms = rotated(lambda r: ops["dequantize"](*reps[r], torch.bfloat16), R_q, cuda)
        graph = timed(lambda r: ops["dequantize"](*reps[r], torch.bfloat16), cuda, R_q) \
            if cuda else None  # graph columns only on CUDA: the CPU would time the same again
        add("dequant", qt, dq, "peftlab", ms, moved, bnb_ms, graph=graph, bnb_graph=bnb_graph)
        reps = None
        if dq:  # quantization, with double quant as QLoRA uses it
            qmoved = 2 * n + nbytes(packed) + state_bytes(state)
            bnb_qms = None
            if bf is not None:
                bnb_qms = rotated(lambda r: bf.quantize_4bit(ws[r], blocksize=64, quant_type=qt,
                                                             compress_statistics=True), R_w, cuda)
                add("quant", qt, dq, "bitsandbytes", bnb_qms, qmoved)
            add("quant", qt, dq, "peftlab",
                rotated(lambda r: ops["quantize"](ws[r], 64, qt, True), R_w, cuda), qmoved,
                bnb_qms)
        checks.append(check_exact(name, w, qt, dq, packed, state, bf, ops))
        del packed, state


def check_exact(name, w, qt, dq, packed, state, bf, ops) -> dict:
    """Mismatch counts: ours (kernel) vs our reference, and vs bitsandbytes."""
    rq, rs = ops["quantize_ref"](w, 64, qt, dq)
    out = ops["dequantize"](packed, state, torch.bfloat16)
    row = dict(shape=name, quant_type=qt, double_quant=dq,
               ref_packed=mismatches(packed, rq), ref_absmax=mismatches(state.absmax, rs.absmax),
               ref_nested=mismatches(state.absmax2, rs.absmax2),
               ref_dequant=mismatches(out, ops["dequantize_ref"](rq, rs, torch.bfloat16)))
    if bf is not None:
        bq, bs = bf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
        row.update(bnb_packed=mismatches(packed, bq),
                   bnb_absmax=mismatches(state.absmax, bs.absmax),
                   bnb_nested=mismatches(state.absmax2, bs.state2.absmax if dq else None),
                   bnb_dequant_same_input=mismatches(ops["dequantize"](bq, _to_ours(bs, ops)),
                                                     bf.dequantize_4bit(bq, bs)))
    return row


def _to_ours(bnb_state, ops):
    """bitsandbytes' QuantState -> ours, through the serialized form both sides share."""
    return ops["QuantState"].from_dict(bnb_state.as_dict(packed=True))


def print_table(title: str, rows: List[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0].keys())
    for r in rows:
        cols += [k for k in r if k not in cols]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols))


def write_csv(path: Path, rows: List[dict], header: Dict[str, str]) -> None:
    if not rows:
        return
    cols = list(header) + [c for c in rows[0]]
    for r in rows:
        cols += [k for k in r if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({**header, **r})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU runs interpreted")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: use --smoke for the CPU (interpreted) code path")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit compiles
    from peftlab.kernels.quant4bit import (dequantize_4bit_triton, last_choice,
                                           quantize_4bit_triton, tuner_choices)
    from peftlab.quant import QuantState, dequantize_4bit_reference, quantize_4bit_reference

    ops = dict(quantize=quantize_4bit_triton, dequantize=dequantize_4bit_triton,
               quantize_ref=quantize_4bit_reference, dequantize_ref=dequantize_4bit_reference,
               QuantState=QuantState, choice=last_choice)
    device = torch.device("cuda" if cuda else "cpu")
    bf = bitsandbytes_cuda()
    vers = lib_versions()
    header = dict(gpu=torch.cuda.get_device_name(device) if cuda else "cpu (interpreted)",
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  **{f"v_{k}": v for k, v in vers.items()})
    rows: List[dict] = []
    checks: List[dict] = []
    t0 = time.time()
    for shape in (SMOKE_SHAPES if args.smoke else SHAPES):
        bench_shape(shape, device, cuda, bf, rows, checks, ops)
        if cuda:
            torch.cuda.empty_cache()
    print(" | ".join(f"{k}: {v}" for k, v in header.items()) + f" | {time.time() - t0:.1f}s")
    print_table("timings (median ms; TB/s = (bytes read + written) / time)", rows)
    print_table("bit-exactness (mismatch counts; -1 = not run)", checks)
    print("\ntuner winners (key: blocksize, size bucket, dtype, quant_type | nested, eligible):")
    winners = [(op, key, desc) for op, c in tuner_choices().items() for key, desc in c.items()]
    for op, key, desc in winners:
        print(f"  {op:8s} {key}: {desc}")
    if not winners:
        print("  none timed (interpreted, or tensors under the tuning threshold)")
    bad = [c for c in checks if any(c[k] > 0 for k in c if k.startswith("ref_"))]
    print("\nkernel vs reference:", "FAIL " + str(bad) if bad else "bit-exact at every size")
    suffix = "_smoke" if args.smoke else ""
    out = Path(args.out)
    write_csv(out / f"bench_quant{suffix}.csv", rows, header)
    write_csv(out / f"bench_quant_check{suffix}.csv", checks, header)
    print(f"wrote {out / f'bench_quant{suffix}.csv'} and {out / f'bench_quant_check{suffix}.csv'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
