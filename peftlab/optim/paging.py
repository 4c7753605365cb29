"""Where each chunk of optimizer state lives, and how a step streams the paged ones.

QLoRA's paged optimizers (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3) move optimizer states
between host and device memory; here the moves are explicit copies rather than page faults.

A chunk (peftlab/optim/layout.py) is either *resident*, one buffer on the device for good, or
*paged*, one buffer in (pinned) host memory that visits the device during a step through a
fixed window of K staging slots. With K = 3 every stage of the pipeline runs at once, each on
its own CUDA stream, ordered by events:

    host (pinned)     H2D stream          compute stream         D2H stream      host
    chunk i+1  ──copy──▶ slot (i+1)%3
    chunk i                               kernel(slot i%3)
    chunk i-1                                                    slot (i-1)%3 ──copy──▶ chunk i-1

    loaded[s]:   H2D done into slot s    (compute waits before the kernel)
    computed[s]: kernel on slot s done   (D2H waits before copying back)
    free[s]:     D2H out of slot s done  (H2D waits before reusing slot s)

Resident chunks are updated on the compute stream while the first paged chunk is loading.
The next step's first copy-in waits for this step's last copy-out (`step_done`), so a host
buffer is never read while it is being written. Host buffers are pinned so the copies are
asynchronous DMA at full PCIe/NVLink-C2C speed.

On a machine without CUDA the "device" is the CPU: the same bookkeeping runs with synchronous
copies, which is what the CPU tests exercise.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .layout import Chunk


class StateStore:
    def __init__(self, chunks: Sequence[Chunk], device: torch.device, num_slots: int = 3):
        self.chunks = list(chunks)
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin = self.cuda
        self.num_slots = num_slots
        self.host: List[Optional[torch.Tensor]] = [None] * len(self.chunks)
        self.dev: List[Optional[torch.Tensor]] = [None] * len(self.chunks)
        self.slots: List[torch.Tensor] = []
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in range(num_slots)]
            self.computed = [torch.cuda.Event() for _ in range(num_slots)]
            self.free = [torch.cuda.Event() for _ in range(num_slots)]
            self.step_done = torch.cuda.Event()

    # ----------------------------------------------------------------- placement
    def _zeros_host(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.uint8, pin_memory=self.pin)

    def place(self, resident: Sequence[bool]) -> None:
        """Initial placement: zero-filled buffers, on the device where `resident[c]`."""
        for c, chunk in enumerate(self.chunks):
            if resident[c]:
                self.dev[c] = torch.zeros(chunk.nbytes, dtype=torch.uint8, device=self.device)
            else:
                self.host[c] = self._zeros_host(chunk.nbytes)
        self._fit_slots()

    def is_resident(self, c: int) -> bool:
        return self.dev[c] is not None

    def resident_bytes(self) -> int:
        return sum(ch.nbytes for c, ch in enumerate(self.chunks) if self.dev[c] is not None)

    def slot_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def host_bytes(self) -> int:
        return sum(ch.nbytes for c, ch in enumerate(self.chunks)
                   if self.dev[c] is None and self.host[c] is not None)

    def _fit_slots(self) -> None:
        """Allocate K slots as large as the largest paged chunk, or none if nothing pages."""
        need = max((ch.nbytes for c, ch in enumerate(self.chunks) if self.dev[c] is None), default=0)
        have = self.slots[0].numel() if self.slots else 0
        if need == have:
            return
        self.synchronize()
        self.slots = [] if need == 0 else [torch.empty(need, dtype=torch.uint8, device=self.device)
                                            for _ in range(self.num_slots)]

    def evict(self, c: int) -> None:
        """Move chunk c's states to host memory and free its device buffer."""
        if self.dev[c] is None:
            return
        self.synchronize()
        if self.host[c] is None:
            self.host[c] = torch.empty(self.chunks[c].nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self.host[c].copy_(self.dev[c])
        self.dev[c] = None

    def promote(self, c: int) -> None:
        """Give chunk c a device buffer and copy its states there (the host copy is kept)."""
        if self.dev[c] is not None:
            return
        self.synchronize()
        self.dev[c] = self.host[c].to(self.device)

    def refit(self) -> None:
        """Resize the staging window after evictions/promotions."""
        self._fit_slots()

    # ----------------------------------------------------------------- access
    def read(self, c: int) -> torch.Tensor:
        """A CPU copy of chunk c's bytes (waits for pending copies)."""
        self.synchronize()
        src = self.dev[c] if self.dev[c] is not None else self.host[c]
        return src.to("cpu", copy=True)

    def write(self, c: int, data: torch.Tensor) -> None:
        """Overwrite chunk c's bytes from a CPU uint8 tensor."""
        self.synchronize()
        dst = self.dev[c] if self.dev[c] is not None else self.host[c]
        dst.copy_(data)

    def synchronize(self) -> None:
        """Wait until every copy and kernel touching states has finished."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.d2h.synchronize()
            self.h2d.synchronize()

    # ----------------------------------------------------------------- the step
    def run(self, chunk_ids: Sequence[int],
            update: Callable[[Chunk, Dict[str, torch.Tensor]], None],
            update_resident: Optional[Callable[[List[int]], None]] = None) -> None:
        """Apply `update(chunk, state views on the device)` to every chunk in chunk_ids; the
        resident ones go to `update_resident(ids)` instead when given (one launch for several)."""
        resident = [c for c in chunk_ids if self.dev[c] is not None]
        paged = [c for c in chunk_ids if self.dev[c] is None]

        def resident_update():
            if update_resident is not None:
                if resident:
                    update_resident(resident)
                return
            for c in resident:
                update(self.chunks[c], self.chunks[c].views(self.dev[c]))
        if not self.cuda:
            resident_update()
            for c in paged:
                n = self.chunks[c].nbytes
                slot = self.slots[0][:n]
                slot.copy_(self.host[c])
                update(self.chunks[c], self.chunks[c].views(slot))
                self.host[c].copy_(slot)
            return
        self._run_cuda(resident_update, paged, update)

    def _run_cuda(self, resident_update, paged, update) -> None:
        compute = torch.cuda.current_stream(self.device)
        k, n = self.num_slots, len(paged)
        self.h2d.wait_event(self.step_done)
        for i in range(n + 2):
            j = i - 2                                   # copy-out of chunk j
            if 0 <= j < n:
                s, c = j % k, paged[j]
                self.d2h.wait_event(self.computed[s])
                with torch.cuda.stream(self.d2h):
                    self.host[c].copy_(self.slots[s][: self.chunks[c].nbytes], non_blocking=True)
                self.free[s].record(self.d2h)
            if i < n:                                   # copy-in of chunk i
                s, c = i % k, paged[i]
                self.h2d.wait_event(self.free[s])
                with torch.cuda.stream(self.h2d):
                    self.slots[s][: self.chunks[c].nbytes].copy_(self.host[c], non_blocking=True)
                self.loaded[s].record(self.h2d)
            if i == 0:                                  # resident chunks overlap the first load
                resident_update()
            j = i - 1                                   # update of chunk j
            if 0 <= j < n:
                s, c = j % k, paged[j]
                compute.wait_event(self.loaded[s])
                update(self.chunks[c], self.chunks[c].views(self.slots[s]))
                self.computed[s].record(compute)
        self.step_done.record(self.d2h)
