"""Where do the 4-bit quantize / dequantize kernels stand against what the memory system allows?

Questions for one run (H200: about 2 minutes):

0. The host cost of one launch, piece by piece (``launch_costs``); host time per call of
   quantize_4bit (NF4, FP4) / dequantize_4bit with quantize's replayed launch, the cached
   launch path (kernels/launch.py) and Triton's JIT launch, interleaved (``launch_paths``);
   every quantize kernel variant alone as CUDA-graph replays; the host time of each step of a
   quantize call.

1. Traffic ceilings for dequantize. Dequantizing n weights reads n/2 packed bytes (+ absmax) and
   writes 2n bytes of bf16: a write-heavy mix, unlike a device copy (half reads, half writes).
   Timed with the same rotation as bench_quant, on the same shapes:
     copy       dst.copy_(src), bf16 -> bf16                   reads 2n, writes 2n
     zero       dst.zero_(), bf16                              writes 2n
     nibbles    a Triton kernel with dequantize's traffic and no table: int32 words in, each of
                the 8 nibbles converted to bf16 and stored (8 x 2 bytes per thread, 16-byte
                stores)                                         reads n/2, writes 2n
     steps      the same plus a table gather per weight and/or a float32 absmax per 64
     dequant    ours, NF4 + double quantization -> bf16         reads n/2 + n/64 + ..., writes 2n
                (the tuner's pick, then every candidate forced; CUDA-graph replays)
   If `nibbles` is not much faster than `dequant`, the decode is not what limits dequantize.

2. Host cost of `quantize_4bit` (the call ends in one scalar read-back: the finite check). For
   4096x4096 and 4096x14336: the rotated do_bench time of the call, the same with the finite
   check switched off (what the sync costs), the loop time per call without the check and
   without synchronising (max of host and device time), and a cProfile of the host side.

    python experiments/quant_probe.py [--quant-only]     # --quant-only: section 0 only
    python experiments/quant_probe.py --launch-only      # launch_costs only
    python experiments/quant_probe.py --paths-only       # launch_costs and launch_paths
    python experiments/quant_probe.py --coding-only      # the coding steps and calls vs bnb
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import nbytes, replicas, rotated, timed  # noqa: E402


@triton.jit
def _steps_kernel(words_ptr, code_ptr, am_ptr, out_ptr, nwords, BLOCK: tl.constexpr,
                  GATHER: tl.constexpr, SCALE: tl.constexpr):
    """int32 words -> 8 bf16 outputs each (code j of a word at bit 4 (j ^ 1)), adding dequantize's
    steps one at a time: GATHER looks each code up in the 16-entry float32 table; SCALE multiplies
    by a float32 absmax per 64 weights (a load per word). Neither: ``nibbles``, the traffic alone."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < nwords
    w = tl.load(words_ptr + i, mask=m, other=0)
    j = tl.arange(0, 8)
    q = (w[:, None] >> ((j ^ 1) * 4)[None, :]) & 15
    if GATHER:
        v = tl.load(code_ptr + q)
    else:
        v = q.to(tl.float32)
    if SCALE:
        v = v * tl.load(am_ptr + i // 8, mask=m, other=0.0)[:, None]
    offs = i[:, None] * 8 + j[None, :]
    tl.store(out_ptr + offs, v.to(tl.bfloat16), mask=m[:, None])


def nibbles(words: torch.Tensor, out: torch.Tensor, block: int = 256) -> None:
    """out[8i + j] = float((word_i >> 4 (j ^ 1)) & 15) as bf16: dequantize's traffic, no table."""
    n = words.numel()
    _steps_kernel[(triton.cdiv(n, block),)](words, words, words, out, n, BLOCK=block, GATHER=False,
                                            SCALE=False, num_warps=4)


def ceilings(shape) -> None:
    import peftlab.kernels.quant4bit as q4
    from peftlab.quant import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    n = w.numel()
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    words = packed.view(-1).view(torch.int32)
    rows = []

    def add(name, ms, moved):
        rows.append((name, ms, moved / (ms * 1e-3) / 1e12))

    R = replicas(4 * n, True)
    srcs = [w] + [w.clone() for _ in range(R - 1)]
    dsts = [torch.empty_like(w) for _ in range(R)]
    add("copy", rotated(lambda r: dsts[r].copy_(srcs[r]), R, True), 4 * n)
    srcs = None
    R = replicas(2 * n, True)
    outs = [torch.empty_like(w) for _ in range(R)]
    add("zero", rotated(lambda r: outs[r].zero_(), R, True), 2 * n)
    R = replicas(2 * n + n // 2, True)
    outs = outs[:R] + [torch.empty_like(w) for _ in range(R - len(outs))]
    wrep = [words] + [words.clone() for _ in range(R - 1)]
    for block in (128, 256, 512):
        add(f"nibbles (block {block} words)",
            rotated(lambda r: nibbles(wrep[r], outs[r], block), R, True), 2 * n + n // 2)
    am32 = state.absmax.float() if not state.nested else torch.rand(n // 64, device="cuda")
    for gather, scale in ((True, False), (False, True), (True, True)):
        add(f"steps (block 256): gather={gather:d} scale={scale:d}",
            rotated(lambda r: _steps_kernel[(triton.cdiv(words.numel(), 256),)](
                wrep[r], state.code, am32, outs[r], words.numel(), BLOCK=256, GATHER=gather,
                SCALE=scale, num_warps=4), R, True), 2 * n + n // 2 + (n // 16 if scale else 0))
    ref = torch.empty_like(w)
    nibbles(words, ref)
    first = ((words[0] >> 4) & 15).item()  # spot check of the ordering: element 0 is bits 4-7
    assert float(ref.view(-1)[0]) == float(first), "nibbles kernel: wrong output order"
    moved = nbytes(packed) + n * 2 + state.absmax.numel()
    st = [(packed, state)] + [(packed.clone(), state) for _ in range(R - 1)]
    add("dequant (ours, nf4+dq, graph)",
        timed(lambda r: dequantize_4bit(*st[r], torch.bfloat16), True, R)[0], moved)
    rows[-1] = (rows[-1][0] + " -> " + q4.last_choice("dequant"),) + rows[-1][1:]
    for c in q4._dequant4.candidates:  # every candidate, forced
        with q4.forced_variant("dequant", c.variant, c.elems, c.num_warps):
            ms = timed(lambda r: dequantize_4bit(*st[r], torch.bfloat16), True, R)[0]
            if q4.last_choice("dequant") == c.describe():  # (skip the ineligible)
                add("  " + c.describe(), ms, moved)
    print(f"\n{shape[0]}x{shape[1]}  ({n / 1e6:.1f}M weights, {R} replicas)")
    for name, ms, tbps in rows:
        print(f"  {name:44s} {ms * 1e3:8.1f} us  {tbps:5.2f} TB/s")


def quantize_host(shape) -> None:
    import peftlab.kernels.quant4bit as q4
    from peftlab.quant import quantize_4bit

    torch.manual_seed(0)
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    R = replicas(2 * w.numel(), True)
    ws = [w] + [w.clone() for _ in range(R - 1)]
    call = lambda r: quantize_4bit(ws[r], blocksize=64, quant_type="nf4", double_quant=True)  # noqa: E731
    with_check = rotated(call, R, True)
    real = q4.check_finite_absmax
    q4.check_finite_absmax = lambda *a, **k: None
    try:
        no_check = rotated(call, R, True)
        for r in range(R):
            call(r)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for k in range(200):
            call(k % R)
        host = (time.perf_counter() - t) / 200
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t) / 200
        prof = cProfile.Profile()
        prof.enable()
        for k in range(200):
            call(k % R)
        prof.disable()
        torch.cuda.synchronize()
    finally:
        q4.check_finite_absmax = real
    print(f"\nquantize {shape[0]}x{shape[1]}: do_bench rotated {with_check * 1e3:.1f} us; without "
          f"the finite check {no_check * 1e3:.1f} us; unsynchronised loop: host {host * 1e6:.1f} us "
          f"per call, host+device {loop * 1e6:.1f} us per call")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


def _quant_inputs(shape):
    """(w, R, flat replicas of w, packed and absmax outputs) for timing the 4-bit quantize
    kernel alone on a bf16 weight of ``shape`` (blocks of 64)."""
    torch.manual_seed(0)
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    n = w.numel()
    R = replicas(2 * n, True)
    xs = [w.view(-1)] + [w.view(-1).clone() for _ in range(R - 1)]
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="cuda")
    absmax = torch.empty(n // 64, dtype=torch.float32, device="cuda")
    return w, R, xs, packed, absmax


def quant_kernels(shape) -> None:
    """Every quantize candidate's kernel alone, as CUDA-graph replays (no host time): reads 2n
    bytes of bf16, writes n/2 packed bytes and n/16 bytes of absmax."""
    import peftlab.kernels.quant4bit as q4

    w, R, xs, packed, absmax = _quant_inputs(shape)
    n, nblocks = w.numel(), w.numel() // 64
    tables = q4._tables("nf4", w.device)
    moved = 2 * n + n // 2 + 4 * nblocks
    print(f"\nquantize kernels {shape[0]}x{shape[1]} (graph replays, {R} replicas)")
    for c in q4._quant4.candidates:
        def fn(r, c=c):
            q4._quant4._run(c, None, (xs[r], packed, absmax, tables, n, nblocks), dict(BS=64))
        ms, how = timed(fn, True, R)
        print(f"  {c.describe():32s} {ms * 1e3:8.1f} us  {moved / (ms * 1e-3) / 1e12:5.2f} TB/s ({how})")


def _host_us(fn, calls: int, warmup: int) -> float:
    """Host microseconds per call of ``fn`` over ``calls`` calls after ``warmup`` (the GPU idle
    before and after, so what is timed is the host side plus any sync the calls make)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return us


def quantize_steps(shape, calls: int = 300) -> None:
    """Host time of each step of ``quantize_4bit`` (perf_counter around the module's callees, no
    extra syncs; the finite check's read-back is the one sync and waits for the kernels)."""
    import peftlab.kernels.quant4bit as q4
    from peftlab.quant import quantize_4bit

    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    spent = {}

    def timing(name, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapped

    names = ("check_quantize_args", "_quant4", "build_state", "_quant8_minus_offset",
             "check_finite_absmax")
    saved = {k: getattr(q4, k) for k in names}
    for k in names:
        setattr(q4, k, timing(k, saved[k]))
    try:
        for _ in range(20):
            quantize_4bit(w, 64, "nf4", True)
        torch.cuda.synchronize()
        spent.clear()
        t = time.perf_counter()
        for _ in range(calls):
            quantize_4bit(w, 64, "nf4", True)
        total = time.perf_counter() - t
    finally:
        for k in names:
            setattr(q4, k, saved[k])
    us = lambda v: v / calls * 1e6  # noqa: E731
    parts = ", ".join(f"{k} {us(v):.1f}" for k, v in spent.items())
    print(f"\nquantize_4bit {shape[0]}x{shape[1]} host steps (us per call): total {us(total):.1f}; "
          f"{parts}")
    x = torch.empty(4096, device="cuda")
    small = torch.randn(16, device="cuda")
    for what, fn in (("torch.empty", lambda: torch.empty(4096, device="cuda")),
                     ("clone 16", lambda: small.clone()), ("mean 4096", lambda: x.mean()),
                     ("_quant8 4096", lambda: q4._quant8(x, q4._code_on("dynamic", x.device), None,
                                                          256, "nearest", small))):
        print(f"  {what:14s} {_host_us(fn, calls, 10):6.1f} us per call (host)")


def launch_paths(shapes=((1024, 4096), (4096, 14336)), calls: int = 300) -> None:
    """Host time per call of quantize_4bit (NF4 and FP4, double quantization) and
    dequantize_4bit, interleaved over three paths: quantize replaying its recorded launch
    (``quant4bit._REPLAY``, session 15), the cached launch (``launch._FAST``), Triton's JIT
    launch (both off, as PEFTLAB_FAST_LAUNCH=0 at import). Each call ends in the quantize's
    read-back (dequantize: a synchronize), so at 4096x14336 this is the call's wall time.
    (Session 15's first run after PEFTLAB_FAST_LAUNCH moved to import time still toggled the
    environment, so both its columns ran the cached path: host noise between rounds.)"""
    import peftlab.kernels.quant4bit as q4
    from peftlab.kernels import launch as L
    from peftlab.quant import dequantize_4bit, quantize_4bit

    modes = {"replay": (True, True), "cached": (True, False), "jit": (False, False)}
    for shape in shapes:
        w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
        packed, state = quantize_4bit(w, 64, "nf4", True)
        fns = (("quantize nf4", lambda: quantize_4bit(w, 64, "nf4", True)),
               ("quantize fp4", lambda: quantize_4bit(w, 64, "fp4", True)),
               ("dequantize nf4", lambda: (dequantize_4bit(packed, state),
                                           torch.cuda.synchronize())))
        res = {}
        try:
            for _ in range(3):
                for mode, (fast, replay) in modes.items():
                    L._FAST, q4._REPLAY = fast, replay
                    for name, fn in fns:
                        res.setdefault((name, mode), []).append(_host_us(fn, calls, 20))
        finally:
            L._FAST, q4._REPLAY = True, True
        print(f"\nhost us per call, {shape[0]}x{shape[1]} (median of 3 interleaved rounds of "
              f"{calls}):")
        for name, _ in fns:
            cols = "   ".join(f"{m} {sorted(res[(name, m)])[1]:6.1f}" for m in modes)
            print(f"  {name:15s} {cols}")


def launch_costs(calls: int = 2000) -> None:
    """Host microseconds of the pieces of one launch of the 8-bit kernel (4096 floats, 11
    arguments, 8 of them tensors) and of the torch calls around it, GPU idle: Triton's JIT
    launch, ``launch.launch`` (cached: since session 14 the launcher called directly, hooks off,
    int pointers), the compiled kernel's runner, its launcher called directly without hooks,
    the same with raw device pointers (ints: the launcher then skips ``data_ptr()`` and
    ``cuPointerGetAttribute`` per tensor)."""
    import peftlab.kernels.quant4bit as q4
    from peftlab.kernels import launch as L

    x = torch.rand(4096, device="cuda")
    codes = torch.empty(4096, dtype=torch.uint8, device="cuda")
    am = torch.empty(16, device="cuda")
    code = q4._code_on("dynamic", x.device)
    off = x.mean()
    out = torch.empty(256, device="cuda")
    args = (x, codes, am, code, codes, off, out, code, code, 4096, 16)
    meta = dict(BS=256, BSP=256, ROWS=16, LUT=False, HAS_OFFSET=True, COPY_CODE=True,
                COPY_CODE4=False, enable_fp_fusion=False, num_warps=4)
    fn = q4._quant8_kernel
    L.launch(fn, (1,), *args, **meta)
    _, compiled, consts, _ = next(v for k, v in L._cache.items() if k[0] == id(fn))
    ptrs = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    dev = torch.cuda.current_device()
    raw_stream = torch._C._cuda_getCurrentRawStream

    def direct(a):
        compiled.run(1, 1, 1, raw_stream(dev), compiled.function, compiled.packed_metadata,
                     None, None, None, *a, *consts)

    rows = [("Triton JIT fn[grid](...)", lambda: fn[(1,)](*args, **meta)),
            ("launch.launch (cached)", lambda: L.launch(fn, (1,), *args, **meta)),
            ("  hooks idle?", L._hooks_idle),
            ("compiled[grid](...)", lambda: compiled[(1, 1, 1)](*args, *consts)),
            ("compiled.run, no hooks", lambda: direct(args)),
            ("compiled.run, int pointers", lambda: direct(ptrs)),
            ("  ints from tensors", lambda: tuple(a.data_ptr() if isinstance(a, torch.Tensor)
                                                  else a for a in args)),
            ("  _fast_device", lambda: L._fast_device(x)),
            ("  current raw stream", lambda: raw_stream(dev)),
            ("torch.empty(4096)", lambda: torch.empty(4096, device="cuda")),
            ("x.mean()", lambda: x.mean()),
            ("float(mean), idle GPU", lambda: float(off)),
            ("x.view(-1)", lambda: x.view(-1))]
    print(f"\nhost us per call, GPU idle (median of 3 rounds of {calls}):")
    for name, f in rows:
        print(f"  {name:28s} {sorted(_host_us(f, calls, 50) for _ in range(3))[1]:6.2f}")


def coding_paths(shapes=((4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192))) -> None:
    """The quantize kernel's coding paths, CUDA-graph replays of the ``words`` kernel alone
    (every table the codes have: ``quant4bit._tables``); then the whole quantize call, NF4 and
    FP4 (its default path and the two-gather cells) with double quantization, against
    bitsandbytes (eager, rotated inputs). Also run here and since removed (4096x14336, against
    the cells' 82 us): session 14's FP4 count guess, 143 us
    (``results/logs/h200_quant_coding_paths_s14.log``); session 15's FP4 magnitude cells (one
    gather), 106 us (``..._s15.log``)."""
    import peftlab.kernels.quant4bit as q4
    from bench_quant import bitsandbytes_cuda
    from peftlab.quant import quantize_4bit

    bf = bitsandbytes_cuda()
    cand = next(c for c in q4._quant4.candidates if c.variant == "words" and c.elems == 2048)
    print(f"\nquantize coding paths ({cand.describe()}, graph replays) and calls (eager):")
    for shape in shapes:
        w, R, xs, packed, absmax = _quant_inputs(shape)
        n, nblocks = w.numel(), w.numel() // 64
        paths = {"fp4 cells": q4._tables("fp4", w.device, "cells"),
                 "nf4 guess": q4._tables("nf4", w.device, "poly"),
                 "nf4 cells": q4._tables("nf4", w.device, "cells")}
        line = []
        for name, tables in paths.items():
            def fn(r, tables=tables):
                q4._quant4._run(cand, None, (xs[r], packed, absmax, tables, n, nblocks),
                                dict(BS=64))
            line.append(f"{name} {timed(fn, True, R)[0] * 1e3:6.1f} us")
        ws = [w] + [w.clone() for _ in range(R - 1)]
        for qt, coding in (("nf4", None), ("fp4", None), ("fp4", "cells")):
            with q4.forced_coding(coding):
                ours = rotated(lambda r: quantize_4bit(ws[r], 64, qt, True), R, True) * 1e3
            text = f"{qt}{'' if coding is None else ' ' + coding} call {ours:6.1f} us"
            if bf is not None:
                bnb = rotated(lambda r: bf.quantize_4bit(ws[r], blocksize=64, quant_type=qt,
                                                         compress_statistics=True), R, True) * 1e3
                text += f" (bnb {bnb:6.1f} us, {bnb / ours:.2f}x)"
            line.append(text)
        print(f"  {shape[0]}x{shape[1]}: " + "; ".join(line), flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if "--coding-only" in sys.argv:
        coding_paths()
        return
    launch_costs()
    if "--launch-only" in sys.argv:
        return
    launch_paths()
    if "--paths-only" in sys.argv:
        return
    for shape in ((4096, 14336), (28672, 8192)):
        quant_kernels(shape)
    for shape in ((1024, 4096), (4096, 14336)):
        quantize_steps(shape)
    if "--quant-only" in sys.argv:
        return
    for shape in ((4096, 14336), (28672, 8192)):
        ceilings(shape)
    for shape in ((4096, 4096), (4096, 14336)):
        quantize_host(shape)


if __name__ == "__main__":
    main()
