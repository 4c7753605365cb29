"""Benchmark of the fused 4-bit matmul (peftlab/kernels/matmul4bit.py) against bf16 and others.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3, eq. 5) runs every frozen linear layer
as ``Y = X · dequant(W_4bit)^T``. For Llama-class weight shapes N x K (4096x4096, 14336x4096,
4096x14336, 8192x8192, 28672x8192) and M in {1, 16, 64, 256, 4096} rows of X (bf16, NF4 with
double quantization, blocksize 64) this script times, side by side in one run,

  bf16        torch ``F.linear`` with the bf16 weight (cuBLAS): the baseline
  deq+linear  dequantize to bf16 (our Triton dequant, else the reference), then ``F.linear``
  bnb         bitsandbytes ``matmul_4bit`` (when it imports with CUDA)
  ours        ``matmul_4bit``: for M <= 16 the mma.sync kernel (``matmul4bit_mma.py``: each lane
              decodes the weights of its own MMA fragments), above it the tiled ``tl.dot``
              kernel (split-K for small M); both with the PRMT decoder (if it passed its
              on-device check)
  ours-dot    the tiled ``tl.dot`` kernel at M <= 16 (what ``ours`` ran there before)
  ours-table  the ``tl.dot`` kernel with the portable table-gather decoder (M <= 16 only)

with ``triton.testing.do_bench`` (median, warm-up excluded, L2 flushed before each repetition)
over replays of a CUDA graph (so no method's Python launch overhead is timed; a method that
cannot be captured is timed eagerly, column ``timing`` in the CSV). Inputs are rotated: each
timed unit runs the call on R replicas of the weights, states and x (R >= 2, together ~3x the L2
size) and the time is divided by R, so no call finds its weight in L2 and the dirty lines that
the flush leaves in L2 (written back to HBM during the next kernel) are not all charged to one
call: for a 4-bit weight smaller than L2 that write-back would otherwise dominate.
Targets (H200): M = 1 >= 3.0x bf16 (4-bit weights are ~3.9x fewer bytes), M = 16 >= 2.5x,
M = 4096 >= 0.95x. Before timing: device ceilings (a device copy, a big bf16 GEMM) and a
correctness pass at real shapes (relative error vs a float64 dequantize-then-matmul, forward and
input gradient, split-K, FP4, fp16, bias, a K that is not a multiple of the blocksize), each
PASS/FAIL. Every timed ``ours`` result is also checked against deq+linear.

Reported per row: time (us), speedup vs bf16, achieved bandwidth (bytes of packed weight +
absmax + x + y over time, and its fraction of the measured copy bandwidth), TFLOP/s (and its
fraction of the measured GEMM peak), target met or missed (and by how much).

    python experiments/bench_kernels.py --out experiments/results     # H200: < 4 minutes
    python experiments/bench_kernels.py --smoke                        # CPU: tiny, interpreted

Writes bench_kernels.csv (one row per shape, M and method) and bench_kernels_roofline.png
(``*_smoke.*`` with --smoke) under --out; the table carries GPU name, versions and date.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import (bitsandbytes_cuda, lib_versions, nbytes, print_table,  # noqa: E402
                         replicas, state_bytes, timed, timer, write_csv)

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]   # N x K
MS = [1, 16, 64, 256, 4096]
SMOKE_SHAPES = [(96, 256)]
SMOKE_MS = [1, 17]
TARGETS = {1: 3.0, 16: 2.5, 4096: 0.95}        # ours / bf16 speedup wanted at these M
# correctness pass: ((N, K), forward Ms, input-gradient Ms, quant_type, double_quant, dtype, bias,
# decoders) (few kernel variants: each new one costs a compile)
# decoder "mma": the default dispatch (the mma.sync kernel for M <= 16)
CHECKS = [
    ((4096, 4096), (1, 16, 300), (16, 300), "nf4", True, torch.bfloat16, False, ("auto",)),
    ((4096, 4096), (1, 5, 16), (), "nf4", True, torch.bfloat16, True, ("mma",)),
    ((28672, 8192), (1, 16), (), "nf4", True, torch.bfloat16, False, ("mma",)),
    ((4096, 14336), (2, 12), (), "fp4", False, torch.float16, True, ("mma",)),
    ((4096, 4096), (16,), (), "nf4", True, torch.bfloat16, False, ("table",)),
    ((28672, 8192), (1, 16, 257), (), "nf4", True, torch.bfloat16, False, ("auto",)),
    ((4096, 14336), (5, 64), (), "fp4", False, torch.float16, True, ("auto",)),
    ((1000, 1000), (1, 40), (40,), "nf4", True, torch.bfloat16, True, ("auto",)),  # K % 64 != 0
]
SMOKE_CHECKS = [((96, 256), (1, 17), (1, 17), "nf4", True, torch.bfloat16, False, ("auto",)),
                ((40, 100), (3,), (3,), "fp4", False, torch.float16, True, ("auto",))]


def ceilings(device: torch.device, cuda: bool, smoke: bool) -> Dict[str, float]:
    """Measured device copy bandwidth (GB/s) and bf16 GEMM throughput (TFLOP/s)."""
    n = (1 << 22) if smoke else (1 << 30)                  # bytes per copy buffer
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src), cuda)
    src = dst = None
    s = 256 if smoke else 8192
    dt = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(s, s, device=device, dtype=dt), torch.randn(s, s, device=device, dtype=dt)
    gemm_ms = timer(lambda: a @ b, cuda)
    return dict(copy_gbps=2 * n / (copy_ms * 1e-3) / 1e9,
                gemm_tflops=2 * s ** 3 / (gemm_ms * 1e-3) / 1e12)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def quantized(w: torch.Tensor, qt: str, dq: bool, bf, ops):
    """(packed, our QuantState, bitsandbytes QuantState or None) of the bf16 weight ``w``."""
    if bf is not None:
        try:
            packed, bstate = bf.quantize_4bit(w, blocksize=64, quant_type=qt,
                                              compress_statistics=dq)
            state = ops["QuantState"].from_dict(bstate.as_dict(packed=True), device=w.device)
            return packed, state, bstate
        except Exception as e:  # noqa: BLE001 - fall back to our quantizer
            print(f"bitsandbytes quantize failed ({type(e).__name__}: {e}); using peftlab's")
    packed, state = ops["quantize"](w, blocksize=64, quant_type=qt, double_quant=dq)
    return packed, state, None


def correctness(checks, device, bf, ops) -> List[dict]:
    """Relative error of ours vs float64 dequantize-then-matmul at real shapes (tiled paths with
    the bucket's first config: the autotuned winners are checked in the timing loop)."""
    rows = []
    for (N, K), fwd_ms, bwd_ms, qt, dq, dtype, has_bias, decoders in checks:
        torch.manual_seed(1)
        w = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
        packed, state, _ = quantized(w, qt, dq, bf, ops)
        W = ops["dequantize_ref"](packed, state, torch.float32).double()
        bias = torch.randn(N, device=device, dtype=dtype) if has_bias else None
        jobs = [("fwd", M, dec) for M in fwd_ms for dec in decoders]
        jobs += [("bwd", M, dec) for M in bwd_ms for dec in decoders]
        for what, M, dec in jobs:
            try:
                err = _check_one(what, M, packed, state, W, bias, dtype, ops, dec)
                status = "PASS" if err < (1e-2 if dtype == torch.bfloat16 else 3e-3) else "FAIL"
            except Exception as e:  # noqa: BLE001 - a failure is a result, not a crash
                err, status = float("nan"), f"FAIL ({type(e).__name__}: {e})"
            rows.append(dict(op=what, shape=f"{N}x{K}", M=M, quant=qt + ("+dq" if dq else ""),
                             dtype=str(dtype).replace("torch.", ""), bias=has_bias, decoder=dec,
                             rel_err=f"{err:.2e}", status=status))
            print(f"  check {what} {N}x{K} M={M} {rows[-1]['quant']} {rows[-1]['dtype']} "
                  f"bias={has_bias} decoder={dec}: rel err {err:.2e} {status}")
        del W, packed, state
    return rows


def _check_one(what, M, packed, state, W, bias, dtype, ops, decoder) -> float:
    """One forward (``what`` = "fwd") or input-gradient ("bwd") check into a NaN-poisoned out."""
    mm = ops["mm"]
    N, K = W.shape
    dev = packed.device
    raw = dict(absmax2=state.absmax2, code2=state.code2, offset=state.offset)
    if what == "fwd":
        x = torch.randn(M, K, device=dev, dtype=dtype)
        out = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
        cfg = (None if decoder == "mma" else
               mm._bucket_configs(ops["fwd_buckets"], mm._m_bucket(M))[0])
        got = mm.matmul4bit_forward(x, packed, state.code, state.absmax, N, K, 64, bias=bias,
                                    out=out, config=cfg,
                                    decoder="auto" if decoder == "mma" else decoder, **raw)
        return rel_err(got, x.double() @ W.T + (0 if bias is None else bias.double()))
    g = torch.randn(M, N, device=dev, dtype=dtype)
    out = torch.full((M, K), float("nan"), device=dev, dtype=dtype)
    cfg = mm._bucket_configs(ops["bwd_buckets"], mm._m_bucket(M))[0]
    got = mm.matmul4bit_backward_input(g, packed, state.code, state.absmax, N, K, 64, out=out,
                                       config=cfg, decoder=decoder, **raw)
    return rel_err(got, g.double() @ W)


def guarded(fn: Callable[[int], object], cuda: bool, reps: int):
    """(median ms per call, result of call 0, how) of ``fn(r)``, or (None, error, "")."""
    try:
        out = fn(0)
        ms, how = timed(fn, cuda, reps)
        return ms, out, how
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:120]}", ""


def verdict(M: int, speedup: Optional[float]) -> str:
    want = TARGETS.get(M)
    if want is None:
        return ""
    if speedup is None:
        return f"MISS (no result; target {want}x)"
    if speedup >= want:
        return f"MET ({speedup:.2f}x >= {want}x)"
    return f"MISS by {100 * (1 - speedup / want):.0f}% ({speedup:.2f}x < {want}x)"


def bench_shape(N, K, ms, device, cuda, bf, ops, ceil, rows, table):
    torch.manual_seed(0)
    w = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
    packed, state, bstate = quantized(w, "nf4", True, bf, ops)
    qbytes = nbytes(packed) + state_bytes(state)
    R = replicas(nbytes(packed), cuda)
    # replica r: its own copy of every weight and quantization state (deepcopy clones tensors)
    reps = [(w, packed, state, bstate)] + [copy.deepcopy((w, packed, state, bstate))
                                          for _ in range(R - 1)]
    for M in ms:
        xs = [torch.randn(M, K, device=device, dtype=torch.bfloat16) for _ in range(R)]
        x = xs[0]
        io = nbytes(x) + M * N * 2
        methods = {
            "bf16": (lambda r: F.linear(xs[r], reps[r][0]), 2 * N * K),
            "deq+linear": (lambda r: F.linear(xs[r], ops["dequantize"](reps[r][1], reps[r][2],
                                                                       torch.bfloat16)), qbytes),
            "bnb": ((lambda r: ops["bnb_matmul"](xs[r], reps[r][1], reps[r][3]))
                    if bstate is not None and ops["bnb_matmul"] is not None else None, qbytes),
            "ours": (lambda r: ops["matmul_4bit"](xs[r], reps[r][1], reps[r][2]), qbytes),
            "ours-dot": ((lambda r: ops["dot_only"](xs[r], reps[r][1], reps[r][2]))
                         if M <= 16 else None, qbytes),
            "ours-table": ((lambda r: ops["matmul_4bit"](xs[r], reps[r][1], reps[r][2], "table"))
                           if M <= 16 else None, qbytes),
        }
        res = {}
        for name, (fn, wbytes) in methods.items():
            ms_, out, how = guarded(fn, cuda, R) if fn is not None else (None, "n/a", "")
            res[name] = (ms_, out)
            row = dict(shape=f"{N}x{K}", M=M, method=name, time_us="", speedup_vs_bf16="",
                       weight_bytes=wbytes, bytes_moved=wbytes + io, gbps="", bw_frac="",
                       tflops="", tflops_frac="", timing=f"{how} x{R}",
                       note="" if ms_ is not None else str(out))
            if ms_ is not None:
                sec = ms_ * 1e-3
                gbps = (wbytes + io) / sec / 1e9
                tflops = 2 * M * N * K / sec / 1e12
                row.update(time_us=_sig(ms_ * 1e3), gbps=_sig(gbps),
                           bw_frac=_sig(gbps / ceil["copy_gbps"]), tflops=_sig(tflops),
                           tflops_frac=_sig(tflops / ceil["gemm_tflops"]))
                base = res["bf16"][0]
                if base is not None:
                    row["speedup_vs_bf16"] = round(base / ms_, 3)
            rows.append(row)
        mma = ops["mma"].mma_choice(M, N, K) if cuda and M <= ops["mm"].MMA_MAX_M else None
        if mma is not None:
            describe = ops["mma"].mma_describe
            print(f"  mma tile for {N}x{K} M={M}: "
                  f"{describe(mma[0])}; candidates (us, graph replays, weight copies rotated): "
                  + ", ".join(f"{describe(c)} {t * 1e3:.1f}" for c, t in mma[1]))
        gemv = ops["mm"].gemv_choice(M, N, K) if cuda else None
        if gemv is not None:
            (bn, bk, warps, per_sm, pf), cands = gemv
            print(f"  GEMV tile for {N}x{K} M={M}: BN={bn} BK={bk} warps={warps} "
                  f"programs/SM={per_sm} prefetch={pf}; candidates (us, unrotated): "
                  + ", ".join(f"{c[0]}x{c[1]}/{c[2]}w{'/pf' if c[4] else ''} {t * 1e3:.1f}"
                              for c, t in cands))
        ours_ms, ours_out = res["ours"]
        check = "n/a"
        if ours_ms is not None and res["deq+linear"][0] is not None:
            err = rel_err(ours_out, res["deq+linear"][1])
            check = f"ok {err:.1e}" if err < 2e-2 else f"BAD {err:.1e}"
        base = res["bf16"][0]
        speed = None if (ours_ms is None or base is None) else base / ours_ms
        last = next(r for r in rows[::-1] if r["method"] == "ours")
        table.append({"shape": f"{N}x{K}", "M": M,
                      **{f"{k}_us": ("-" if v[0] is None else round(v[0] * 1e3, 1))
                         for k, v in res.items()},
                      "ours/bf16": "-" if speed is None else f"{speed:.2f}x",
                      "bnb/bf16": ("-" if res["bnb"][0] is None or base is None
                                   else f"{base / res['bnb'][0]:.2f}x"),
                      "ours_GB/s": last["gbps"], "ours_%bw": _pct(last["bw_frac"]),
                      "ours_TFLOP/s": last["tflops"], "ours_%peak": _pct(last["tflops_frac"]),
                      "check": check, "target": verdict(M, speed)})
        x = xs = None
    w = packed = state = bstate = reps = None


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def _pct(frac) -> str:
    return "" if frac == "" else f"{100 * frac:.0f}%"


def roofline(path: Path, rows: List[dict], ceil: Dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = [2 ** e for e in range(-2, 14)]
    bw, peak = ceil["copy_gbps"] * 1e9, ceil["gemm_tflops"]
    ax.plot(ai, [min(peak, a * bw / 1e12) for a in ai], "k-", lw=1,
            label=f"ceiling: {ceil['copy_gbps']:.4g} GB/s copy, {peak:.4g} TFLOP/s GEMM")
    styles = {"bf16": ("x", "tab:gray"), "deq+linear": ("s", "tab:orange"),
              "bnb": ("^", "tab:green"), "ours-table": ("v", "tab:purple"),
              "ours": ("o", "tab:blue")}
    for method, (marker, color) in styles.items():
        pts = [(r["M"], r["shape"], 2 * r["M"] * _nk(r["shape"]) / r["bytes_moved"], r["tflops"])
               for r in rows if r["method"] == method and r["tflops"] not in ("", 0.0)]
        if pts:
            ax.scatter([p[2] for p in pts], [p[3] for p in pts], marker=marker, color=color,
                       label=method, alpha=0.8)
        if method == "ours":
            for m, _, x, y in pts:
                ax.annotate(f"M={m}", (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved: weight + absmax + x + y)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nk(shape: str) -> int:
    n, k = shape.split("x")
    return int(n) * int(k)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for the CSV and the roofline PNG")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; without a GPU the kernels run interpreted")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not (cuda or args.smoke):
        print("no CUDA device: use --smoke for the CPU (interpreted) code path")
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"       # before any @triton.jit is compiled
    from peftlab.kernels import matmul4bit as mm
    from peftlab.kernels import matmul4bit_mma
    from peftlab.kernels.decode4bit import prmt_decoder_ok
    from peftlab.kernels.matmul4bit import Matmul4bitFunction
    from peftlab.kernels import matmul4bit_kernels as mk
    from peftlab.quant import QuantState, dequantize_4bit_reference, quantize_4bit

    try:
        from peftlab.kernels.quant4bit import dequantize_4bit_triton as dequantize
    except Exception as e:  # noqa: BLE001
        print(f"Triton dequant unavailable ({type(e).__name__}); deq+linear uses the reference")
        dequantize = dequantize_4bit_reference
    device = torch.device("cuda" if cuda else "cpu")
    bf = bitsandbytes_cuda()
    bnb_matmul = None
    if bf is not None:
        import bitsandbytes

        bnb_matmul = bitsandbytes.matmul_4bit
    def ours(x, packed, state, decoder="auto"):
        return Matmul4bitFunction.apply(x, packed, state, None, "triton", decoder)

    def dot_only(x, packed, state):     # the tl.dot kernel where the mma one would run
        with mm.mma_off():
            return ours(x, packed, state)

    ops = dict(mm=mm, mma=matmul4bit_mma, matmul_4bit=ours, dot_only=dot_only,
               dequantize=dequantize,
               dequantize_ref=dequantize_4bit_reference, quantize=quantize_4bit,
               QuantState=QuantState, bnb_matmul=bnb_matmul,
               fwd_buckets=mk._FWD_BUCKETS, bwd_buckets=mk._BWD_BUCKETS)
    t_start = time.time()
    header = dict(gpu=torch.cuda.get_device_name(device) if cuda else "cpu (interpreted)",
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  **{f"v_{k}": v for k, v in lib_versions().items()})
    header["prmt_decoder"] = ("verified" if cuda and prmt_decoder_ok(device, torch.bfloat16)
                              else "off (table decoder)")
    print(" | ".join(f"{k}: {v}" for k, v in header.items()))
    ceil = ceilings(device, cuda, args.smoke)
    print(f"ceilings: device copy {ceil['copy_gbps']:.0f} GB/s, bf16 GEMM "
          f"{ceil['gemm_tflops']:.0f} TFLOP/s ({time.time() - t_start:.1f}s)")
    header.update({k: round(v, 1) for k, v in ceil.items()})
    checks = []
    if not args.no_check:
        print("correctness (rel err vs float64 dequantize-then-matmul):")
        checks = correctness(SMOKE_CHECKS if args.smoke else CHECKS, device, bf, ops)
        print(f"  ({time.time() - t_start:.1f}s)")
    rows: List[dict] = []
    table: List[dict] = []
    for N, K in (SMOKE_SHAPES if args.smoke else SHAPES):
        bench_shape(N, K, SMOKE_MS if args.smoke else MS, device, cuda, bf, ops, ceil, rows,
                    table)
        if cuda:
            torch.cuda.empty_cache()
        print(f"  timed {N}x{K} ({time.time() - t_start:.1f}s)")
    print_table("matmul, NF4 + double quant, bf16 (median us; ours_%bw = bytes moved / time vs "
                "device copy; ours_%peak vs bf16 GEMM)", table)
    failed = [c for c in checks if c["status"] != "PASS"]
    bad = [t for t in table if t["check"].startswith("BAD")]
    print(f"\ncorrectness: {len(checks) - len(failed)}/{len(checks)} PASS; timed outputs vs "
          f"deq+linear: {len(table) - len(bad)}/{len(table)} ok")
    suffix = "_smoke" if args.smoke else ""
    out = Path(args.out)
    write_csv(out / f"bench_kernels{suffix}.csv", rows, header)
    png = out / f"bench_kernels_roofline{suffix}.png"
    roofline(png, rows, ceil, f"4-bit matmul roofline, {header['gpu']}, {header['date']}")
    print(f"wrote {out / f'bench_kernels{suffix}.csv'} and {png} "
          f"({time.time() - t_start:.1f}s total)")
    return 1 if (failed or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
