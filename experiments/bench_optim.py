"""Benchmark of PagedAdamW (peftlab/optim) on one GPU, side by side with torch.optim.AdamW.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3) pages optimizer states to CPU memory so
that memory spikes do not end a run. Sections (each runs even if another fails):

  1. bandwidth    pinned host->device, device->host, both at once (1 GiB copies)
  2. paged        step time with every state paged, ~100M and ~400M fp32 parameters; achieved
                  fraction of the bidirectional copy bandwidth, bytes = states in + states out
                  (params and grads stay on the GPU). Target: >= 70 %.
  3. resident     every state on the GPU: 100M parameters and a LoRA-sized model (448 tensors of
                  8 x 4096) vs torch.optim.AdamW fused=True and foreach=True. Target: within 10 %.
  4. correctness  trajectory vs torch.optim.AdamW(foreach=False) over 20 steps (max |diff| / max |p|
                  <= 1e-6 per tensor),
                  paged / partial / resident / auto, bf16 params, 8-bit Triton vs reference: PASS/FAIL
  5. capped       GPU memory capped with torch.cuda.set_per_process_memory_fraction so that
                  AdamW states do not fit: torch.optim.AdamW hits OOM, PagedAdamW completes;
                  peak memory and step time of both (and bitsandbytes' PagedAdamW32bit if it
                  imports with CUDA; its unified memory is not counted by PyTorch's allocator).

    python experiments/bench_optim.py --out experiments/results       # on the GPU (< 3 min)
    python experiments/bench_optim.py --smoke                          # CPU: tiny sizes, logic only

Prints one table (GPU name, library versions, date) and writes bench_optim.csv
(bench_optim_smoke.csv with --smoke) under --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.optim import PagedAdamW  # noqa: E402

GiB = 1 << 30
ROWS: List[dict] = []


def record(section, case, metric, value, unit="", note=""):
    ROWS.append(dict(section=section, case=case, metric=metric, value=value, unit=unit, note=note))


def versions():
    out = {"torch": torch.__version__}
    for name in ("triton", "bitsandbytes"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - report whatever stops the import
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_params(device, n_tensors, shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02)
          for _ in range(n_tensors)]
    for p in ps:
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 1e-3
    return ps


def time_steps(opt, device, steps, warmup=2):
    for _ in range(warmup):
        opt.step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return (time.perf_counter() - t) / steps


# ----------------------------------------------------------------------------- 1. bandwidth
def bench_bandwidth(args, device):
    if device.type != "cuda":
        record("bandwidth", "-", "skipped", "", "", "needs CUDA")
        return None
    n = (64 << 20) if args.smoke else GiB
    host_a = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.uint8, device=device)
    dev_b = torch.empty(n, dtype=torch.uint8, device=device)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn, reps=5):
        best = float("inf")
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    def both():
        with torch.cuda.stream(s1):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(dev_b, non_blocking=True)

    h2d = n / timed(lambda: dev_a.copy_(host_a, non_blocking=True)) / 1e9
    d2h = n / timed(lambda: host_b.copy_(dev_b, non_blocking=True)) / 1e9
    bi = 2 * n / timed(both) / 1e9
    for case, v in (("host->device", h2d), ("device->host", d2h), ("bidirectional", bi)):
        record("bandwidth", case, "bandwidth", round(v, 1), "GB/s", f"{n >> 20} MiB pinned")
    host_a = host_b = dev_a = dev_b = None
    free_memory()
    return {"h2d": h2d, "d2h": d2h, "bi": bi}


# ----------------------------------------------------------------------------- 2. paged
def bench_paged(args, device, bw):
    sizes = [(2, (64, 1024))] if args.smoke else [(6, (4096, 4096)), (24, (4096, 4096))]
    for bits in (32, 8):
        for n_tensors, shape in sizes:
            if bits == 8 and n_tensors > sizes[0][0]:
                continue                                  # one 8-bit row is enough
            ps = make_params(device, n_tensors, shape)
            n_params = sum(p.numel() for p in ps)
            opt = PagedAdamW(ps, lr=1e-4, state_bits=bits, gpu_budget_bytes=None)
            rep = opt.memory_report()
            sec = time_steps(opt, device, 2 if args.smoke else 5)
            moved = 2 * rep["state_bytes"]
            case = f"{n_params / 1e6:.1f}M params, {bits}-bit states"
            record("paged", case, "step time", round(sec * 1e3, 2), "ms",
                   f"{rep['chunks']} chunks, staging {rep['staging_bytes'] / 2 ** 20:.1f} MiB")
            record("paged", case, "copy throughput", round(moved / sec / 1e9, 1), "GB/s",
                   "states in + out per step")
            if bw:
                record("paged", case, "fraction of bidirectional bw",
                       round(moved / sec / 1e9 / bw["bi"], 3), "", "target >= 0.70")
                record("paged", case, "fraction of one-way bw (in+out serial)",
                       round(moved / sec / 1e9 / (2 / (1 / bw["h2d"] + 1 / bw["d2h"])), 3), "", "")
            del opt, ps
            free_memory()


# ----------------------------------------------------------------------------- 3. resident
def bench_resident(args, device):
    cases = [("100M params (24 x 2048x2048)", 24, (2048, 2048)),
             ("LoRA-sized (448 x 8x4096)", 448, (8, 4096))]
    if args.smoke:
        cases = [("smoke 8 x 64x64", 8, (64, 64)), ("smoke LoRA 40 x 8x64", 40, (8, 64))]
    steps = 3 if args.smoke else 30
    for case, n_tensors, shape in cases:
        results = {}
        makers = {
            "PagedAdamW resident": lambda ps: PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=1 << 50),
            "PagedAdamW paged": lambda ps: PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=None),
            "PagedAdamW 8-bit resident": lambda ps: PagedAdamW(ps, lr=1e-4, state_bits=8,
                                                               gpu_budget_bytes=1 << 50),
            "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        }
        if device.type == "cuda":
            makers["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)
        for name, make in makers.items():
            try:
                ps = make_params(device, n_tensors, shape)
                opt = make(ps)
                results[name] = time_steps(opt, device, steps)
                record("resident", case, name, round(results[name] * 1e3, 3), "ms/step")
            except Exception as e:  # noqa: BLE001 - one optimizer failing must not hide the rest
                record("resident", case, name, "ERROR", "", f"{type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                opt = ps = None
                free_memory()
        ours = results.get("PagedAdamW resident")
        for base in ("torch AdamW fused", "torch AdamW foreach"):
            if ours and base in results:
                record("resident", case, f"ours / {base}", round(ours / results[base], 3), "",
                       "target <= 1.10")


def bench_resident_tiles(args, device):
    """The 32-bit kernel's tile (elements per program, warps) on the 100M-parameter case: wall
    ms/step, and the host's share (time to enqueue one step, no sync)."""
    if device.type != "cuda" or args.smoke:
        record("resident tiles", "-", "skipped", "", "", "needs CUDA")
        return
    import peftlab.kernels.adamw as kadam

    default = (kadam.BLOCK32, kadam.WARPS32)
    try:
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            kadam.BLOCK32, kadam.WARPS32 = block, warps
            ps = make_params(device, 24, (2048, 2048))
            opt = PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=1 << 50)
            wall = time_steps(opt, device, 30)
            t = time.perf_counter()
            for _ in range(10):
                opt.step()
            host = (time.perf_counter() - t) / 10
            sync(device)
            record("resident tiles", f"BLOCK32={block} warps={warps}", "PagedAdamW resident",
                   round(wall * 1e3, 3), "ms/step", f"host enqueue {host * 1e3:.3f} ms/step")
            opt = ps = None
            free_memory()
    finally:
        kadam.BLOCK32, kadam.WARPS32 = default


# ----------------------------------------------------------------------------- 4. correctness
def bench_correctness(args, device):
    shapes = [(1,), (7,), (1000,), (33, 17), (4096, 3), (70000,), (5, 4)]

    def params(dtype=torch.float32):
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]

    def groups(ps):
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.0},
                {"params": ps[2:5], "lr": 3e-3, "weight_decay": 0.1}, {"params": ps[5:]}]

    def run(opts_and_params, steps=20):
        for t in range(steps):
            gen = torch.Generator().manual_seed(100 + t)
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for _, ps in opts_and_params:
                for i, (p, g) in enumerate(zip(ps, grads)):
                    p.grad = None if (t + i) % 5 == 0 else g.to(device, p.dtype)
            for opt, _ in opts_and_params:
                opt.step()

    def rel_err(a, b):
        """max over tensors of max|a - b| / max|b| (elementwise ratios blow up near zero)."""
        return max(((x.detach().float() - y.detach().float()).abs().max() /
                    y.detach().float().abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))

    configs = {"all paged": dict(), "small chunks (split + packed)": dict(chunk_bytes=4096),
               "partial budget": dict(chunk_bytes=65536, gpu_budget_bytes=4 * 65536 + 65536),
               "all resident": dict(gpu_budget_bytes=1 << 40), "auto": dict(gpu_budget_bytes="auto")}
    for name, kw in configs.items():
        ref_ps, ps = params(), params()
        ref = torch.optim.AdamW(groups(ref_ps), foreach=False)
        opt = PagedAdamW(groups(ps), **kw)
        run([(ref, ref_ps), (opt, ps)])
        err = rel_err(ps, ref_ps)
        record("correctness", f"32-bit vs torch AdamW, {name}", "max rel err", f"{err:.2e}",
               "", "PASS" if err <= 1e-6 else "FAIL")
    # bf16 parameters and 8-bit states: the fused kernel vs the reference twin on this device
    for label, dtype, bits in (("bf16 params", torch.bfloat16, 32), ("8-bit states", torch.float32, 8)):
        a, b = params(dtype), params(dtype)
        oa = PagedAdamW(groups(a), state_bits=bits, impl="reference", chunk_bytes=65536)
        ob = PagedAdamW(groups(b), state_bits=bits, chunk_bytes=65536)
        run([(oa, a), (ob, b)])
        err = rel_err(b, a)
        # bf16: one rounding step; 8-bit: a rare code flip moves one element by ~lr * 5 %
        tol = {8: 1e-4}.get(bits, 1e-6 if dtype == torch.float32 else 2 ** -7)
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        flips = max(((sa[i][k] != sb[i][k]).float().mean().item()
                     for i in sa for k in sa[i] if sa[i][k].dtype == torch.uint8), default=0.0)
        ok = err <= tol and flips < 1e-3
        record("correctness", f"{label}: {ob.memory_report()['impl']} vs reference", "max rel err",
               f"{err:.2e}", "", ("PASS" if ok else "FAIL") + f" (code flips {flips:.1e})")


# ----------------------------------------------------------------------------- 5. capped
def bench_capped(args, device):
    if device.type != "cuda":
        record("capped", "-", "skipped", "", "", "needs CUDA")
        return
    n_tensors, shape = 60, (4096, 4096)                  # 1.0B fp32 params: 4 GB + 4 GB grads
    n_params = n_tensors * shape[0] * shape[1]
    cap = 12 * GiB                                      # AdamW states (8 GB) do not fit
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, torch.cuda.current_device())
    case = f"{n_params / 1e9:.2f}B params, cap {cap / GiB:.0f} GiB"
    try:
        def attempt(name, make, steps=3):
            ps = opt = None
            free_memory()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                ps = make_params(device, n_tensors, shape)
                opt = make(ps)
                sec = time_steps(opt, device, steps, warmup=1)
                record("capped", case, f"{name}: step time", round(sec * 1e3, 1), "ms")
                record("capped", case, f"{name}: outcome", "completed", "")
            except torch.cuda.OutOfMemoryError:
                record("capped", case, f"{name}: outcome", "OOM", "", "torch.cuda.OutOfMemoryError")
            except Exception as e:  # noqa: BLE001
                record("capped", case, f"{name}: outcome", "ERROR", "", f"{type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                peak = torch.cuda.max_memory_allocated(device)
                record("capped", case, f"{name}: peak GPU memory", round(peak / GiB, 2), "GiB")
                del ps, opt
                free_memory()

        attempt("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True))
        attempt("PagedAdamW", lambda ps: PagedAdamW(ps, lr=1e-5, gpu_budget_bytes=None))
        attempt("PagedAdamW 8-bit", lambda ps: PagedAdamW(ps, lr=1e-5, state_bits=8))
        try:
            import bitsandbytes as bnb
            attempt("bnb PagedAdamW32bit", lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-5))
        except Exception as e:  # noqa: BLE001 - bitsandbytes without CUDA, or not installed
            record("capped", case, "bnb PagedAdamW32bit", "skipped", "", f"{type(e).__name__}: {e}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())


# ----------------------------------------------------------------------------- driver
def print_table(header, rows):
    print(header)
    cols = ["section", "case", "metric", "value", "unit", "note"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU")
    args = ap.parse_args(argv)
    ROWS.clear()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running the --smoke sizes on the CPU")
        args.smoke = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    vers = versions()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    header = (f"bench_optim | device: {name} | torch {vers['torch']} | triton {vers['triton']} | "
              f"bitsandbytes {vers['bitsandbytes']} | {date}" + (" | SMOKE" if args.smoke else ""))
    print(header, flush=True)
    bw = None
    sections: List[tuple] = [("bandwidth", lambda: bench_bandwidth(args, device))]
    sections += [("paged", lambda: bench_paged(args, device, bw)),
                 ("resident", lambda: bench_resident(args, device)),
                 ("resident tiles", lambda: bench_resident_tiles(args, device)),
                 ("correctness", lambda: bench_correctness(args, device)),
                 ("capped", lambda: bench_capped(args, device))]
    for sec_name, fn in sections:
        t = time.perf_counter()
        print(f"[{sec_name}] ...", flush=True)
        try:
            out = fn()
            if sec_name == "bandwidth":
                bw = out
        except Exception as e:  # noqa: BLE001 - a failing section must not stop the others
            traceback.print_exc()
            record(sec_name, "-", "ERROR", "", "", f"{type(e).__name__}: {e}")
        free_memory()
        print(f"[{sec_name}] {time.perf_counter() - t:.1f} s", flush=True)
    print_table(header, ROWS)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("bench_optim_smoke.csv" if args.smoke else "bench_optim.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "device", "torch", "triton", "bitsandbytes",
                                          "section", "case", "metric", "value", "unit", "note"])
        w.writeheader()
        for r in ROWS:
            w.writerow(dict(date=date, device=name, torch=vers["torch"], triton=vers["triton"],
                            bitsandbytes=vers["bitsandbytes"], **r))
    print(f"wrote {path}")
    return ROWS


if __name__ == "__main__":
    main()
