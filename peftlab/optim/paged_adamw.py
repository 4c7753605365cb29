"""PagedAdamW: AdamW whose states live in host memory and stream through the GPU in chunks.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3, "Paged Optimizers") pages optimizer
states to CPU RAM so that a memory spike does not end a run; bitsandbytes does it with CUDA
unified memory, page faults deciding what moves. Here every byte moves explicitly, so the cost
can be read off the code and measured (experiments/bench_optim.py).

The update is AdamW (Loshchilov & Hutter, arXiv 1711.05101, Alg. 2), exactly as
torch.optim.AdamW computes it, for a parameter theta with gradient g at step t:

    theta_t = theta_{t-1} * (1 - lr * wd)                       decoupled weight decay
    m_t     = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t     = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    theta_t = theta_t - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

The pipeline of one step (peftlab/optim/paging.py has the stream/event details):

      pinned host RAM                       GPU
    +-----------------+   H2D stream    +-------------------+
    | chunk 0  m|v    | --------------> | staging slot 0    |--+   compute stream:
    | chunk 1  m|v    | --------------> | staging slot 1    |  +-> one fused kernel per chunk
    | chunk 2  m|v    | <-------------- | staging slot 2    |--+   reads p, g, m, v once,
    |   ...           |   D2H stream    +-------------------+      writes p, m, v once
    +-----------------+                 | resident chunks   | <- updated in place, no copies
                                        | params, grads     |
                                        +-------------------+
    copy-in of chunk i+1 || update of chunk i || copy-out of chunk i-1

Chunks (peftlab/optim/layout.py) pack many small parameters together, so a LoRA model with
hundreds of small tensors costs a handful of launches. Where the states live:

* gpu_budget_bytes=None: every chunk pages.
* an int: chunks stay resident on the device, in order, while they fit in the budget (the
  staging window, num_slots x the largest paged chunk, is counted in the budget when anything
  pages); the rest page.
* "auto": at every step, if free device memory (torch.cuda.mem_get_info plus what PyTorch's
  allocator holds unused) is below `headroom_bytes`, resident chunks are evicted to host memory
  (last first); when it is above twice the headroom plus a chunk, paged chunks come back.

state_bits=8 keeps m and v as blockwise 8-bit codes (Dettmers et al. 2021, arXiv 2110.02861):
the signed dynamic map for m, the unsigned one for v, one float32 absmax per 256 elements;
parameters with fewer than `min_8bit_size` (4096) elements keep 32-bit states, as in
bitsandbytes. That is 2 + 8/256 bytes of state per parameter instead of 8.

The fused update is a Triton kernel (peftlab/kernels/adamw.py) on CUDA and the plain-PyTorch
twin (adamw_reference.py) elsewhere; on a CPU-only machine the CPU plays the device, so the
chunking, budgets and state handling run in CI.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, TrainingError
from . import state_convert
from .adamw_reference import (QUANT_BLOCK, adamw8bit_step_reference,
                              adamw_scalars, adamw_step_reference)
from .layout import Chunk, plan_chunks
from .paging import StateStore

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CHUNK_BYTES = 64 << 20
IMPLS = ("auto", "triton", "reference")


def _check_hyper(lr, betas, eps, weight_decay, where: str) -> None:
    def num(x, name):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ConfigError(f"{where}: {name}={x!r} must be a finite number")
        return float(x)

    if num(lr, "lr") < 0:
        raise ConfigError(f"{where}: lr={lr} must be >= 0")
    if num(eps, "eps") < 0:
        raise ConfigError(f"{where}: eps={eps} must be >= 0")
    if num(weight_decay, "weight_decay") < 0:
        raise ConfigError(f"{where}: weight_decay={weight_decay} must be >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"{where}: betas={betas!r} must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not 0.0 <= num(b, f"betas[{i}]") < 1.0:
            raise ConfigError(f"{where}: betas[{i}]={b} must be in [0, 1)")


class PagedAdamW(torch.optim.Optimizer):
    """Drop-in torch.optim.AdamW with paged (and optionally 8-bit) states; see module docstring.

    Extra keyword arguments: num_slots (staging slots, >= 2), headroom_bytes ("auto" mode),
    min_8bit_size, impl ("auto" | "triton" | "reference"), memory_probe (a callable returning
    (free_bytes, total_bytes) of the device, replacing the CUDA query; for tests).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, state_bits: int = 32,
                 gpu_budget_bytes=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
                 num_slots: int = 3, headroom_bytes: Optional[int] = None,
                 min_8bit_size: int = 4096, impl: str = "auto",
                 memory_probe: Optional[Callable[[], Tuple[int, int]]] = None):
        where = "PagedAdamW"
        _check_hyper(lr, betas, eps, weight_decay, where)
        if isinstance(state_bits, bool) or state_bits not in (32, 8):
            raise ConfigError(f"{where}: state_bits={state_bits!r} must be 32 or 8")
        if not (gpu_budget_bytes is None or gpu_budget_bytes == "auto" or
                (isinstance(gpu_budget_bytes, int) and not isinstance(gpu_budget_bytes, bool)
                 and gpu_budget_bytes >= 0)):
            raise ConfigError(f"{where}: gpu_budget_bytes={gpu_budget_bytes!r} must be None, a "
                              f"byte count >= 0, or \"auto\"")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
            raise ConfigError(f"{where}: chunk_bytes={chunk_bytes!r} must be an int")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 2:
            raise ConfigError(f"{where}: num_slots={num_slots!r} must be an int >= 2")
        if headroom_bytes is not None and (not isinstance(headroom_bytes, int) or headroom_bytes < 0):
            raise ConfigError(f"{where}: headroom_bytes={headroom_bytes!r} must be an int >= 0")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ConfigError(f"{where}: min_8bit_size={min_8bit_size!r} must be an int >= 0")
        if impl not in IMPLS:
            raise ConfigError(f"{where}: impl={impl!r} is not one of {IMPLS}")
        self.state_bits = state_bits
        self.gpu_budget_bytes = gpu_budget_bytes
        self.chunk_bytes = chunk_bytes
        self.num_slots = num_slots
        self.headroom_bytes = headroom_bytes
        self.min_8bit_size = min_8bit_size
        self._impl_request = impl
        self._probe = memory_probe
        self._ready = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        try:
            super().__init__(params, defaults)
        except (TypeError, ValueError) as e:   # empty list, non-tensors, duplicates
            raise ConfigError(f"{where}: {e}") from None
        self._ready = True
        self._rebuild(include=set())

    # ================================================================== layout
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        where = f"PagedAdamW.add_param_group (group {len(self.param_groups)})"
        if isinstance(param_group, dict):
            d = self.defaults
            _check_hyper(param_group.get("lr", d.get("lr", 0.0)),
                         param_group.get("betas", d.get("betas", (0.9, 0.999))),
                         param_group.get("eps", d.get("eps", 0.0)),
                         param_group.get("weight_decay", d.get("weight_decay", 0.0)), where)
        try:
            super().add_param_group(param_group)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if getattr(self, "_ready", False):
            saved = self._export_states()
            try:
                self._rebuild(include=set())
            except ConfigError:          # refused (device, dtype): the optimizer stays as it was
                self.param_groups.pop()
                self._rebuild(include=set())
                self._import_states(saved)
                raise
            self._import_states(saved)

    def _rebuild(self, include: set) -> None:
        """(Re)plan chunks for every parameter that needs grad or is in `include`."""
        if getattr(self, "_store", None) is not None:
            self._store.synchronize()
        params = [p for g in self.param_groups for p in g["params"]]
        self._params: List[torch.Tensor] = params
        self._group_of = np.array([gi for gi, g in enumerate(self.param_groups) for _ in g["params"]],
                                  dtype=np.int64)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ConfigError(f"PagedAdamW: parameters are on several devices {sorted(map(str, devices))}; "
                              f"use one optimizer per device")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        for i, p in enumerate(params):
            if p.dtype not in PARAM_DTYPES:
                raise ConfigError(f"PagedAdamW: parameter {i} (shape {tuple(p.shape)}) has dtype "
                                  f"{p.dtype}; supported: float32, bfloat16, float16")
        self._bits = [8 if (self.state_bits == 8 and p.numel() >= self.min_8bit_size) else 32
                      for p in params]
        self._in_layout = np.array([p.requires_grad or i in include for i, p in enumerate(params)],
                                   dtype=bool)
        self._steps = np.zeros(len(params), dtype=np.int64)
        for p in params:
            if not p.is_contiguous():        # the kernels address parameters as flat arrays
                p.data = p.data.contiguous()
        self._esize = np.array([p.element_size() for p in params], dtype=np.int64)
        entries = [(i, p.numel(), p.dtype, self._bits[i]) for i, p in enumerate(params)
                   if self._in_layout[i] and p.numel() > 0]
        self.chunks: List[Chunk] = plan_chunks(entries, self.chunk_bytes)
        # global segment numbering: chunk c owns segments [seg0[c], seg0[c+1])
        segs = [s for c in self.chunks for s in c.segments]
        self._seg_param = np.array([s.param for s in segs], dtype=np.int64)
        self._seg_start = np.array([s.start for s in segs], dtype=np.int64)
        self._seg0 = np.cumsum([0] + [len(c.segments) for c in self.chunks]).astype(np.int64)
        self._param_segments: Dict[int, List[Tuple[int, int]]] = {}
        for c in self.chunks:
            for k, s in enumerate(c.segments):
                self._param_segments.setdefault(s.param, []).append((c.index, k))
        self._impl = self._choose_impl()
        # device tables: per chunk id (blocks, segs); per resident group (ids, ptrs) its merged pair
        self._dev_tables: Dict[object, Optional[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._codes = None
        self._store = StateStore(self.chunks, self.device, self.num_slots)
        self._store.place(self._initial_residency())

    def _choose_impl(self) -> str:
        if self._impl_request != "auto":
            if self._impl_request == "triton" and self.device.type != "cuda":
                if os.environ.get("TRITON_INTERPRET") != "1":
                    raise ConfigError("PagedAdamW: impl='triton' on CPU parameters needs "
                                      "TRITON_INTERPRET=1")
            return self._impl_request
        if self.device.type == "cuda":
            try:
                import triton  # noqa: F401
                return "triton"
            except ImportError:
                return "reference"
        return "reference"

    def _initial_residency(self) -> List[bool]:
        sizes = [c.nbytes for c in self.chunks]
        budget = self.gpu_budget_bytes
        if budget is None or not sizes:
            return [False] * len(sizes)
        if budget == "auto":
            free, _ = self._free_memory()
            budget = max(0, free - 2 * self._headroom())
        if sum(sizes) <= budget:
            return [True] * len(sizes)
        room = budget - self.num_slots * max(sizes)
        resident = []
        for n in sizes:
            resident.append(n <= room)
            room -= n if n <= room else 0
        return resident

    # ================================================================== memory policy
    def _free_memory(self) -> Tuple[int, int]:
        if self._probe is not None:
            return self._probe()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return free + unused, total
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            return info["MemAvailable"], info["MemTotal"]
        except (OSError, KeyError, ValueError, IndexError):
            return 1 << 62, 1 << 62

    def _headroom(self) -> int:
        if self.headroom_bytes is not None:
            return self.headroom_bytes
        return min(4 << 30, self._free_memory()[1] // 10)

    def _auto_balance(self) -> None:
        free, _ = self._free_memory()
        headroom = self._headroom()
        changed = False
        if free < headroom:
            # the staging window is allocated when the first chunk pages: count it
            need = headroom + (0 if self._store.slot_bytes() else
                               self.num_slots * max(c.nbytes for c in self.chunks))
            for c in reversed(range(len(self.chunks))):
                if free >= need:
                    break
                if self._store.is_resident(c):
                    self._store.evict(c)
                    free += self.chunks[c].nbytes
                    changed = True
        else:
            for c in range(len(self.chunks)):
                if not self._store.is_resident(c) and free - self.chunks[c].nbytes >= 2 * headroom:
                    self._store.promote(c)
                    free -= self.chunks[c].nbytes
                    changed = True
        if changed:
            self._store.refit()

    def memory_report(self) -> Dict[str, Any]:
        """Bytes of state on the device (resident + staging window) and in host memory."""
        n_params = int(sum(self._params[i].numel() for i in np.flatnonzero(self._in_layout)))
        state = sum(c.nbytes for c in self.chunks)
        return {"chunks": len(self.chunks),
                "resident_chunks": sum(self._store.is_resident(c) for c in range(len(self.chunks))),
                "state_bytes": state, "device_state_bytes": self._store.resident_bytes(),
                "staging_bytes": self._store.slot_bytes(), "host_state_bytes": self._store.host_bytes(),
                "params": n_params, "state_bytes_per_param": state / max(1, n_params),
                "impl": self._impl}

    # ================================================================== the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params
        grads = [p.grad for p in params]
        has_grad = np.fromiter((g is not None for g in grads), dtype=bool, count=len(grads))
        if not has_grad.any():
            return loss
        if (has_grad & ~self._in_layout).any():       # a frozen parameter started to train
            saved = self._export_states()
            self._rebuild(include=set(np.flatnonzero(self._in_layout | has_grad).tolist()))
            self._import_states(saved)
        flat_grads = self._prepare_grads(grads, has_grad)
        self._steps[has_grad] += 1
        table, idx, inv, rows = self._scalars(has_grad)
        if self.gpu_budget_bytes == "auto":
            self._auto_balance()
        seg_active = has_grad[self._seg_param]
        chunk_ids = [c for c in range(len(self.chunks))
                     if seg_active[self._seg0[c]:self._seg0[c + 1]].any()]
        update_resident = None
        if self._impl == "triton":
            update, update_resident = self._triton_updater(flat_grads, has_grad, rows, chunk_ids)
        else:
            scalars = {i: table[k] for i, k in zip(idx.tolist(), inv.tolist())}
            update = self._reference_updater(flat_grads, has_grad, scalars)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self._store.run(chunk_ids, update, update_resident)
        else:
            self._store.run(chunk_ids, update, update_resident)
        return loss

    def _prepare_grads(self, grads, has_grad) -> List[Optional[torch.Tensor]]:
        """Gradients as contiguous tensors (torch already enforces their shape and dtype)."""
        out = list(grads)
        for i in np.flatnonzero(has_grad).tolist():
            g = grads[i]
            if g.is_sparse:
                p = self._params[i]
                raise TrainingError(f"PagedAdamW: parameter {i} (shape {tuple(p.shape)}) has a "
                                    f"sparse gradient; AdamW needs dense gradients")
            if not g.is_contiguous():
                out[i] = g.contiguous()
        return out

    def _scalars(self, has_grad):
        """The update's scalars for every parameter that steps.

        Returns (table, idx, inv, rows): one AdamWScalars per distinct (group, step) pair
        (computed in Python floats, exactly as torch does), the stepping parameters `idx`, the
        table entry of each (`inv`), and float32 rows [n_params, 8] for the kernel (last column:
        1 where the parameter steps).
        """
        groups = []
        for gi, g in enumerate(self.param_groups):
            lr = float(g["lr"])
            b1, b2 = (float(b) for b in g["betas"])
            if lr < 0:
                raise ConfigError(f"PagedAdamW: param group {gi} has lr={lr} < 0")
            groups.append((lr, b1, b2, float(g["eps"]), float(g["weight_decay"])))
        idx = np.flatnonzero(has_grad)
        keys = self._group_of[idx] * (1 << 40) + self._steps[idx]
        uniq, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(-1)
        table = []
        for key in uniq.tolist():
            lr, b1, b2, eps, wd = groups[key >> 40]
            table.append(adamw_scalars(lr, b1, b2, eps, wd, key & ((1 << 40) - 1)))
        rows = np.zeros((len(self._params), 8), dtype=np.float32)
        rows[idx, :7] = np.array([s.as_row() for s in table], dtype=np.float64)[inv]
        rows[idx, 7] = 1.0
        return table, idx, inv, rows

    # ------------------------------------------------------------------ reference path
    def _reference_updater(self, flat_grads, has_grad, scalars):
        params = self._params

        def update(chunk: Chunk, views: Dict[str, torch.Tensor]) -> None:
            for seg in chunk.segments:
                if not has_grad[seg.param]:
                    continue
                a, b = seg.start, seg.start + seg.length
                p = params[seg.param].detach().view(-1)[a:b]
                g = flat_grads[seg.param].view(-1)[a:b]
                s = scalars[seg.param]
                if chunk.bits == 32:
                    o = seg.state_off
                    adamw_step_reference(p, g, views["m"][o:o + seg.length],
                                         views["v"][o:o + seg.length], s)
                else:
                    code_m, code_v, _, _ = self._code_tables()
                    qo, nb = seg.state_off, -(-seg.length // QUANT_BLOCK)
                    qa = qo * QUANT_BLOCK
                    adamw8bit_step_reference(p, g, views["qm"][qa:qa + seg.length],
                                             views["am"][qo:qo + nb], views["qv"][qa:qa + seg.length],
                                             views["av"][qo:qo + nb], s, code_m, code_v)
        return update

    # ------------------------------------------------------------------ triton path
    def _code_tables(self):
        if self._codes is None:
            from ..quant.codes import dynamic_map
            cm = dynamic_map(signed=True, device=self.device)
            cv = dynamic_map(signed=False, device=self.device)
            self._codes = (cm, cv, (cm[:-1] + cm[1:]) / 2, (cv[:-1] + cv[1:]) / 2)
        return self._codes

    def _staging(self, n: int) -> torch.Tensor:
        """An int64 host buffer [n] for this step's kernel tables: on CUDA one of two pinned
        buffers used in turn (allocating pinned memory every step costs more than the update of
        a 100M-parameter model), reused once the copy that last read it has run."""
        if self.device.type != "cuda":
            return torch.empty(n, dtype=torch.int64)
        if not hasattr(self, "_staged") or self._staged[0].numel() < n:
            self._staged = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._staged_copy = [torch.cuda.Event(), torch.cuda.Event()]
            self._staged_turn = 1
        self._staged_turn ^= 1
        self._staged_copy[self._staged_turn].synchronize()   # returns at once: two steps back
        return self._staged[self._staged_turn][:n]

    def _triton_updater(self, flat_grads, has_grad, rows, chunk_ids):
        """(update(chunk, views), update_resident(ids)) for StateStore.run: one kernel launch per
        paged chunk, and one for all resident 32-bit chunks together (a launch costs the host
        more than a 64 MiB chunk costs the GPU)."""
        from peftlab.kernels.adamw import BLOCK32, QBLOCK, adamw8_chunk, adamw32_chunk

        params = self._params
        sp = self._seg_param
        p_ptr = np.array([p.data_ptr() for p in params], dtype=np.int64)
        g_ptr = np.array([0 if g is None else g.data_ptr() for g in flat_grads], dtype=np.int64)
        seg_active = has_grad[sp]

        def tables(c: int):
            """(blocks, segs) of chunk c on the device; a 32-bit chunk's segs in adamw32_chunk's
            [S, 3] form (m offset, v offset, length), so no launch pays for the conversion."""
            if c not in self._dev_tables:
                chunk = self.chunks[c]
                seg = chunk.segment_table()
                if chunk.bits == 32:
                    seg = torch.cat([seg[:, :1], seg], 1)
                blk = BLOCK32 if chunk.bits == 32 else QBLOCK
                self._dev_tables[c] = (chunk.block_table(blk).to(self.device),
                                       seg.to(self.device))
            return self._dev_tables[c]

        # resident 32-bit chunks: one launch for all (`merged` tables) unless their buffers'
        # distances rule it out; decided before the per-step tables are laid out by group
        dev = self._store.dev
        together = [c for c in chunk_ids if self.chunks[c].bits == 32 and dev[c] is not None]
        merged = None
        if len(together) >= 2:
            group_views = [self.chunks[c].views(dev[c]) for c in together]
            merged = self._group_tables(together, group_views, tables)
        if merged is None:
            together = []
        groups = ([tuple(together)] if together else []) + [(c,) for c in chunk_ids
                                                            if c not in together]
        # the per-step tables hold each group's segments contiguously: rows[lo:hi] of group g
        order = np.concatenate([np.arange(self._seg0[c], self._seg0[c + 1]) for g in groups for c in g]
                               ) if groups else np.zeros(0, dtype=np.int64)
        n = len(order)
        base_p = np.zeros(n, dtype=np.int64)
        base_g = np.zeros(n, dtype=np.int64)
        span: Dict[tuple, Tuple[int, int]] = {}
        gbase_param: Dict[tuple, int] = {}
        lo = 0
        for g in groups:
            hi = lo + sum(self._seg0[c + 1] - self._seg0[c] for c in g)
            segs_g = order[lo:hi]
            # bases: the group's first parameter, its first active segment's gradient
            first_active = int(sp[segs_g[int(np.argmax(seg_active[segs_g]))]])
            gbase_param[g] = first_active
            base_p[lo:hi] = p_ptr[sp[segs_g[0]]]
            base_g[lo:hi] = g_ptr[first_active]
            span[g] = (lo, hi)
            lo = hi
        spo = sp[order]
        es = self._esize[spo]
        active = seg_active[order]
        p_off = (p_ptr[spo] - base_p) // es + self._seg_start[order]
        g_off = np.where(active, (g_ptr[spo] - base_g) // es + self._seg_start[order], 0)
        misaligned = ((p_off % 8) != 0) | ((g_off % 8) != 0)
        align = {g: 1 if misaligned[a:b].any() else 8 for g, (a, b) in span.items()}
        seg_align = np.ones(n, dtype=np.int64)
        for g, (a, b) in span.items():
            seg_align[a:b] = align[g]
        t = self._staging(n * 6)
        host = t.numpy()
        host[: 2 * n].reshape(n, 2)[:] = np.stack([p_off // seg_align, g_off // seg_align], 1)
        host[2 * n:].view(np.float32).reshape(n, 8)[:] = rows[spo]
        if self.device.type == "cuda":
            t = t.to(self.device, non_blocking=True)
            self._staged_copy[self._staged_turn].record(torch.cuda.current_stream(self.device))
        addrs = t[: 2 * n].view(n, 2)
        hyper = t[2 * n:].view(torch.float32).view(n, 8)
        if self.state_bits == 8:
            code_m, code_v, bounds_m, bounds_v = self._code_tables()

        def launch(g: tuple, views: Dict[str, torch.Tensor], blocks, segs) -> None:
            a, b = span[g]
            pb = params[int(sp[order[a]])].detach()
            gb = flat_grads[gbase_param[g]]
            if self.chunks[g[0]].bits == 32:
                adamw32_chunk(pb, gb, views["m"], views["v"], blocks, segs, addrs[a:b],
                              hyper[a:b], align[g])
            else:
                adamw8_chunk(pb, gb, views["qm"], views["qv"], views["am"], views["av"], code_m,
                             code_v, bounds_m, bounds_v, blocks, segs, addrs[a:b], hyper[a:b],
                             align[g])

        def update(chunk: Chunk, views: Dict[str, torch.Tensor]) -> None:
            launch((chunk.index,), views, *tables(chunk.index))

        def update_resident(ids: List[int]) -> None:
            if together:
                launch(tuple(together), group_views[0], *merged)
            for c in ids:
                if c not in together:
                    update(self.chunks[c], self.chunks[c].views(dev[c]))
        return update, update_resident

    def _group_tables(self, ids, views, tables) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(blocks, segs) on the device for one launch over the resident 32-bit chunks `ids`
        (`tables(c)`: a chunk's own pair, segs [S, 3]): block tables concatenated (segment
        numbers shifted), and segs whose m and v offsets count from the first chunk's views
        (cached while the chunks stay where they are); None if the buffers' distances are not
        whole multiples of 8 elements (then: one launch each)."""
        key = (tuple(ids), tuple(v["m"].data_ptr() for v in views))
        if key in self._dev_tables:
            return self._dev_tables[key]
        for k in [k for k in self._dev_tables if isinstance(k, tuple)]:
            del self._dev_tables[k]                      # chunks moved or residency changed
        m0, v0 = views[0]["m"].data_ptr(), views[0]["v"].data_ptr()
        blocks, segs, shift = [], [], 0
        for c, v in zip(ids, views):
            blk, seg = tables(c)
            dm, dv = v["m"].data_ptr() - m0, v["v"].data_ptr() - v0
            if dm % 32 or dv % 32:
                self._dev_tables[key] = None
                return None
            dm, dv = dm // 32, dv // 32                  # in units of 8 float32 elements
            segs.append(seg + torch.tensor([dm, dv, 0], dtype=seg.dtype, device=seg.device))
            blocks.append(blk + torch.tensor([shift, 0], dtype=blk.dtype, device=blk.device))
            shift += seg.shape[0]
        out = (torch.cat(blocks).contiguous(), torch.cat(segs).contiguous())
        self._dev_tables[key] = out
        return out

    # ================================================================== state dicts
    def _chunk_bytes_cpu(self, cache: Dict[int, torch.Tensor], c: int) -> torch.Tensor:
        if c not in cache:
            cache[c] = self._store.read(c)
        return cache[c]

    def _param_state(self, i: int, cache: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Parameter i's state as CPU tensors, in torch.optim.AdamW's keys (8-bit: + absmax)."""
        p = self._params[i]
        parts: Dict[str, List[torch.Tensor]] = {}
        for c, k in self._param_segments.get(i, []):
            chunk, seg = self.chunks[c], self.chunks[c].segments[k]
            views = chunk.views(self._chunk_bytes_cpu(cache, c))
            if chunk.bits == 32:
                o, n = seg.state_off, seg.length
                parts.setdefault("exp_avg", []).append(views["m"][o:o + n])
                parts.setdefault("exp_avg_sq", []).append(views["v"][o:o + n])
            else:
                qo, nb = seg.state_off, -(-seg.length // QUANT_BLOCK)
                qa, n = qo * QUANT_BLOCK, seg.length
                parts.setdefault("exp_avg", []).append(views["qm"][qa:qa + n])
                parts.setdefault("exp_avg_sq", []).append(views["qv"][qa:qa + n])
                parts.setdefault("exp_avg_absmax", []).append(views["am"][qo:qo + nb])
                parts.setdefault("exp_avg_sq_absmax", []).append(views["av"][qo:qo + nb])
        out = {"step": torch.tensor(float(self._steps[i]), dtype=torch.float32)}
        for key, ts in parts.items():
            t = torch.cat(ts) if ts else torch.zeros(0)
            out[key] = t.view(p.shape) if key in ("exp_avg", "exp_avg_sq") else t.clone()
        if p.numel() == 0:
            out["exp_avg"] = torch.zeros(p.shape)
            out["exp_avg_sq"] = torch.zeros(p.shape)
        return out

    def _write_param_state(self, i: int, st: Dict[str, torch.Tensor],
                           cache: Dict[int, torch.Tensor], dirty: set) -> None:
        for c, k in self._param_segments.get(i, []):
            chunk, seg = self.chunks[c], self.chunks[c].segments[k]
            views = chunk.views(self._chunk_bytes_cpu(cache, c))
            dirty.add(c)
            a, n = seg.start, seg.length
            if chunk.bits == 32:
                o = seg.state_off
                views["m"][o:o + n] = st["exp_avg"].reshape(-1)[a:a + n]
                views["v"][o:o + n] = st["exp_avg_sq"].reshape(-1)[a:a + n]
            else:
                qo, nb = seg.state_off, -(-n // QUANT_BLOCK)
                qa, ba = qo * QUANT_BLOCK, a // QUANT_BLOCK
                views["qm"][qa:qa + n] = st["exp_avg"].reshape(-1)[a:a + n]
                views["qv"][qa:qa + n] = st["exp_avg_sq"].reshape(-1)[a:a + n]
                views["am"][qo:qo + nb] = st["exp_avg_absmax"][ba:ba + nb]
                views["av"][qo:qo + nb] = st["exp_avg_sq_absmax"][ba:ba + nb]

    def _export_states(self) -> Dict[int, Dict[str, torch.Tensor]]:
        """Every stepped parameter's state, keyed by id(param) (for re-layouts)."""
        cache: Dict[int, torch.Tensor] = {}
        return {id(self._params[i]): self._param_state(i, cache)
                for i in np.flatnonzero(self._steps > 0)}

    def _import_states(self, saved: Dict[int, Dict[str, torch.Tensor]]) -> None:
        states = {i: saved[id(p)] for i, p in enumerate(self._params) if id(p) in saved}
        self._load_param_states(states)

    def _load_param_states(self, states: Dict[int, Dict[str, torch.Tensor]]) -> None:
        """Replace all states: `states` for the parameters listed, zeros for the others."""
        extra = [i for i in states if not self._in_layout[i]]
        if extra:
            self._rebuild(include=set(np.flatnonzero(self._in_layout).tolist()) | set(extra))
        cache = {c: torch.zeros(ch.nbytes, dtype=torch.uint8) for c, ch in enumerate(self.chunks)}
        self._steps[:] = 0
        for i, st in states.items():
            st = state_convert.to_bits(st, self._bits[i], self._code_tables_cpu())
            self._steps[i] = st["step"]
            self._write_param_state(i, st, cache, set())
        for c, data in cache.items():
            self._store.write(c, data)

    def _code_tables_cpu(self):
        from ..quant.codes import dynamic_map
        return dynamic_map(signed=True), dynamic_map(signed=False)

    def state_dict(self) -> Dict[str, Any]:
        """{"state": {index: {...}}, "param_groups": [...]}, as torch.optim.AdamW's.

        State tensors are CPU copies. 32-bit states: step, exp_avg, exp_avg_sq (float32, the
        parameter's shape), loadable by torch.optim.AdamW. 8-bit states: exp_avg / exp_avg_sq
        are uint8 codes plus exp_avg_absmax / exp_avg_sq_absmax (float32 per 256 elements).
        Parameters that never stepped have no entry, as in torch.
        """
        cache: Dict[int, torch.Tensor] = {}
        state = {int(i): self._param_state(int(i), cache) for i in np.flatnonzero(self._steps > 0)}
        groups, start = [], 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict of PagedAdamW or torch.optim.AdamW (same parameter layout).

        32-bit states are quantized when this optimizer keeps 8-bit states, and the reverse.
        Anything that does not fit (group count or sizes, tensor shapes, unknown keys, amsgrad)
        raises CheckpointError naming the group, parameter and tensor.
        """
        groups, states = state_convert.check_state_dict(state_dict, self.param_groups, self._params)
        for g, saved in zip(self.param_groups, groups):
            _check_hyper(saved.get("lr", g["lr"]), saved.get("betas", g["betas"]),
                         saved.get("eps", g["eps"]), saved.get("weight_decay", g["weight_decay"]),
                         "PagedAdamW.load_state_dict")
            for k, v in saved.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
        self._load_param_states(states)
