"""Where does a resident PagedAdamW step lose to torch's fused AdamW? Kernel time vs the rest.

100M float32 parameters in 24 tensors of 2048x2048, every state resident on the GPU. For each
optimizer, 10 steps under torch.profiler: the summed device time of its CUDA kernels per step,
the host time per step (perf_counter, synchronized), and the top kernels. If the kernel times
are close and the step times are not, the gap is host-side (Python, launches, syncs); otherwise
it is the kernel.

    python experiments/adamw_probe.py        # H200: ~30 s
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.optim import PagedAdamW  # noqa: E402


def params(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(2048, 2048, device=dev, generator=g) * 0.02)
          for _ in range(24)]
    for p in ps:
        p.grad = torch.randn(2048, 2048, device=dev, generator=g) * 1e-3
    return ps


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    makers = {"torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
              "PagedAdamW resident": lambda ps: PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=1 << 50)}
    for name, make in makers.items():
        ps = params(dev)
        opt = make(ps)
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            opt.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                opt.step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        dev_total = sum(e.self_device_time_total for e in events) / 10 / 1e3
        print(f"\n{name}: wall {wall * 1e3:.3f} ms/step; device time of its kernels "
              f"{dev_total:.3f} ms/step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:5]:
            print(f"   {e.key[:70]:70s} {e.self_device_time_total / 10 / 1e3:8.3f} ms/step "
                  f"({e.count // 10} calls/step)")
        opt = ps = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
