"""Where does the small-M 4-bit matmul spend its time? A probe, one shape, several stripped kernels.

For W [N, K] NF4 (blocksize 64) and x [1, K] bf16 this times, on CUDA with do_bench (L2 flushed):

  mem      load the packed words only, sum them as floats (the memory roofline of our load pattern)
  shift    decode by shifts (q as a float, no table), x de-interleaved, FMA: the arithmetic floor
  prmt     decode8 with the PRMT byte permutes, x loads, FMA (the GEMV kernel's inner loop)
  prmt-x1  decode8 PRMT, no x loads (codes summed): the decode alone
  table    decode8 with table gathers, x loads, FMA

for a few tiles, with the compiled kernel's registers and spills, and writes the PTX of every
variant and of the production kernels (GEMV and tensor-core) under --out for reading.

    python experiments/gemv_probe.py --out /tmp/probe          # H200: ~1 minute
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.kernels.decode4bit import decode8, planes, table_planes  # noqa: E402

MODES = {"mem": 0, "shift": 1, "prmt": 2, "prmt-x1": 3, "table": 4}


@triton.jit
def _probe(x_ptr, w_ptr, code_ptr, tab_ptr, y_ptr, N, K, KQ, MODE: tl.constexpr,
           BN: tl.constexpr, BQ: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    per = tl.cdiv(KQ, tl.num_programs(1))
    q_lo = pid_k * per
    q_hi = tl.minimum(KQ, q_lo + per)
    t0, t1, t2, t3, t4, t5, t6, t7 = table_planes(tab_ptr)
    acc = tl.zeros([BN, BQ], dtype=tl.float32)
    for q0 in range(q_lo, q_hi, BQ):
        qj = q0 + tl.arange(0, BQ)
        wd = tl.load(w_ptr + rows.to(tl.int64)[:, None] * KQ + qj[None, :])
        if MODE == 0:
            acc += wd.to(tl.float32)
        else:
            if MODE == 1:
                e0 = ((wd >> 4) & 15).to(tl.float32)
                e1 = (wd & 15).to(tl.float32)
                e2 = ((wd >> 12) & 15).to(tl.float32)
                e3 = ((wd >> 8) & 15).to(tl.float32)
                e4 = ((wd >> 20) & 15).to(tl.float32)
                e5 = ((wd >> 16) & 15).to(tl.float32)
                e6 = ((wd >> 28) & 15).to(tl.float32)
                e7 = ((wd >> 24) & 15).to(tl.float32)
            else:
                e0, e1, e2, e3, e4, e5, e6, e7 = decode8(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6,
                                                         t7, MODE != 4)
            if MODE == 3:
                acc += (e0.to(tl.float32) + e1.to(tl.float32) + e2.to(tl.float32)
                        + e3.to(tl.float32) + e4.to(tl.float32) + e5.to(tl.float32)
                        + e6.to(tl.float32) + e7.to(tl.float32))
            else:
                xp = x_ptr + 8 * qj
                acc += tl.load(xp).to(tl.float32)[None, :] * e0.to(tl.float32)
                acc += tl.load(xp + 1).to(tl.float32)[None, :] * e1.to(tl.float32)
                acc += tl.load(xp + 2).to(tl.float32)[None, :] * e2.to(tl.float32)
                acc += tl.load(xp + 3).to(tl.float32)[None, :] * e3.to(tl.float32)
                acc += tl.load(xp + 4).to(tl.float32)[None, :] * e4.to(tl.float32)
                acc += tl.load(xp + 5).to(tl.float32)[None, :] * e5.to(tl.float32)
                acc += tl.load(xp + 6).to(tl.float32)[None, :] * e6.to(tl.float32)
                acc += tl.load(xp + 7).to(tl.float32)[None, :] * e7.to(tl.float32)
    tl.atomic_add(y_ptr + rows, tl.sum(acc, axis=1))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--N", type=int, default=28672)
    ap.add_argument("--K", type=int, default=8192)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    N, K = args.N, args.K
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (N * K // 8,), dtype=torch.int32, device=dev)
    x = torch.randn(K, device=dev, dtype=torch.bfloat16)
    code = torch.linspace(-1, 1, 16, device=dev).to(torch.bfloat16)
    tab = planes(code, torch.bfloat16)
    y = torch.zeros(N, device=dev)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    bf16_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x[None], w))
    packed_mb = N * K / 2 / 1e6
    print(f"N={N} K={K}: packed {packed_mb:.1f} MB; bf16 F.linear {bf16_ms * 1e3:.1f} us")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for mode, m in MODES.items():
        for bn, bq, warps, per_sm in ((16, 64, 4, 8), (32, 32, 4, 8), (64, 32, 8, 4), (8, 128, 4, 8)):
            tiles = N // bn
            steps = K // 8 // bq
            s = max(1, min(steps, -(-per_sm * sms // tiles)))
            grid = (tiles, s)
            k = _probe[grid](x, words, code, tab, y, N, K, K // 8, MODE=m, BN=bn, BQ=bq,
                             num_warps=warps)
            ms = triton.testing.do_bench(lambda: _probe[grid](x, words, code, tab, y, N, K, K // 8,
                                                              MODE=m, BN=bn, BQ=bq,
                                                              num_warps=warps))
            print(f"{mode:8s} BN={bn:3d} BQ={bq:3d} warps={warps} split={s:2d}: {ms * 1e3:7.1f} us "
                  f"{packed_mb / ms / 1e3:6.2f} TB/s  regs={k.n_regs} spills={k.n_spills}")
            if bn == 16:
                (out / f"probe_{mode}.ptx").write_text(k.asm["ptx"])
    # production kernels' PTX for one small-M call each
    from peftlab.kernels import matmul4bit as mm
    from peftlab.quant import quantize_4bit

    wq = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    packed, st = quantize_4bit(wq, blocksize=64, quant_type="nf4", double_quant=True)
    default = mm.GEMV_MAX_M
    try:               # the GEMV is opt-in (GEMV_MAX_M = 0 by default): route M = 1 to it here
        mm.GEMV_MAX_M = 1
        for M in (1, 16):
            xx = torch.randn(M, 4096, device=dev, dtype=torch.bfloat16)
            mm.matmul_4bit(xx, packed, st)
    finally:
        mm.GEMV_MAX_M = default
    for kern, name in ((mm._mm4_gemv_kernel, "gemv"), (mm._mm4_fwd_kernel, "fwd")):
        try:   # the JIT cache's layout differs between Triton versions
            for dev_cache in kern.device_caches.values():
                cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for i, ck in enumerate(cache.values()):
                    (out / f"{name}_{i}.ptx").write_text(ck.asm["ptx"])
                    print(f"{name} variant {i}: regs={ck.n_regs} spills={ck.n_spills}")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: could not read the JIT cache ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
