"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

Triton's JIT launch does, on every call: bind the arguments, derive the kernel's
*specialization* from each of them (a tensor's dtype and whether its address is 16-byte
aligned; an integer's width, whether it is divisible by 16, whether it equals 1), build a cache
key from that and the stringified options, look the compiled kernel up, check the globals it
captured, and only then call the compiled launcher (the runner), which on Triton 3.6 also
builds a launch-metadata object, calls the (empty) launch hooks and, per tensor, calls
``data_ptr()`` and ``cuPointerGetAttribute``.

``launch(fn, grid, *args, **meta)`` keeps its own cache per kernel: the key is the same
properties of the runtime arguments, computed in a few attribute reads per argument (``arg_key``;
``tests/test_launch.py`` checks on a battery of values that it separates everything Triton's
own specializer separates), plus the constexprs and options in ``meta`` (by value and type:
True, 1 and 1.0 differ to Triton) and the device. A miss launches through the JIT (which
compiles or finds the kernel) and keeps the CompiledKernel it returns. A hit calls the compiled
kernel's launcher itself, as the runner (``compiled[grid](*args)``) does, minus what that costs
when nothing uses it: no hooks while none is registered, no launch-metadata object, tensors as
their device addresses (plain ints). Only a tensor on another device than the current one would
have been caught by the pointer check it skips, so such a tensor (or one not on CUDA) takes
the JIT path and gets Triton's error. The direct call is used only when the installed Triton's
runner makes exactly that call (checked once from its source); otherwise hits go through
``compiled[grid]``. The interpreter (``TRITON_INTERPRET=1``), CPU tensors and
``PEFTLAB_FAST_LAUNCH=0`` take the JIT path every time; both are read once, at import
(interpretation from Triton's ``knobs.runtime.interpret``, which ``triton.jit`` consults when it
decorates a kernel and which follows ``TRITON_INTERPRET``).

``record()`` collects a ``Replay`` of each direct launch made inside it: the same kernel, grid,
integers and constexprs, called later with other tensors (the caller's own key must fix their
dtypes, alignment and device); ``quantize_4bit_triton`` replays its 4-bit launch this way.

Measured (``experiments/quant_probe.py``'s ``launch_costs``, one launch of the 8-bit kernel with
11 arguments, GPU idle, two H200 hosts, ``results/logs/h200_launch_costs_s14_direct.log`` and
``..._final.log``): Triton's JIT launch 18.6 / 32.5 us, the runner 9.0 / 15.7 us, the launcher
with hooks off 6.3 / 11.1 us and with int pointers 4.8 / 8.3 us; ``launch`` as a whole 14.9 /
26.4 us (its own device lookup, then two environment reads, and its key are the rest; session
15 moved the environment reads to import time). Not in the key, as in
Triton's JIT cache they are: ``TRITON_DEBUG``, instrumentation modes and changed globals the
kernel captured (none of ours do).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple

import torch

from .tuning import _interpreting

try:
    from triton import knobs
except ImportError:   # Triton < 3.3: hooks live elsewhere; hits take compiled[grid]
    knobs = None

_I32 = (-(1 << 31), 1 << 31)


def arg_key(a: Any):
    """What Triton specializes a runtime argument on, as a hashable value (a superset of it)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, (a.data_ptr() & 15) == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return a == 1, (a & 15) == 0, _I32[0] <= a < _I32[1], a < 0, a >= 1 << 63
    if isinstance(a, float):
        return float
    return type(a), a  # anything else (e.g. a dtype): by value


_FAST = os.environ.get("PEFTLAB_FAST_LAUNCH", "1") != "0"   # read at import, as TRITON_INTERPRET
_int_keys: Dict[int, tuple] = {}


def _int_key(a: int) -> tuple:
    """``arg_key`` of a plain int, memoised (sizes and counts repeat from call to call)."""
    k = _int_keys.get(a)
    if k is None:
        if len(_int_keys) >= 4096:
            _int_keys.clear()
        k = _int_keys[a] = arg_key(a)
    return k


def _fast_device(first) -> Optional[int]:
    """The current CUDA device when the cached path may serve a launch whose first argument is
    ``first`` (a CUDA tensor, not interpreting, not switched off), else None."""
    if _FAST and isinstance(first, torch.Tensor) and not _interpreting(first):
        return _current_device()   # first is a CUDA tensor: CUDA is initialised
    return None


# torch.cuda.current_device() minus its lazy-initialisation check
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


_cache: Dict[tuple, tuple] = {}
_RUNNER_CALL = ("self.run(grid[0], grid[1], grid[2], stream, self.function, "
                "self.packed_metadata, launch_metadata,")
_direct_ok: Optional[bool] = None


def runner_is_plain() -> bool:
    """Does the installed Triton's ``CompiledKernel.__getitem__`` runner call
    ``self.run(grid..., stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *args)``, the call ``launch`` makes itself on a hit? (Read once from its source.)"""
    global _direct_ok
    if _direct_ok is None:
        import inspect
        try:
            from triton.compiler.compiler import CompiledKernel
            src = " ".join(inspect.getsource(CompiledKernel.__getitem__).split())
        except (ImportError, OSError, TypeError):
            src = ""
        _direct_ok = _RUNNER_CALL in src
    return _direct_ok


def _direct(compiled) -> bool:
    from triton.compiler.compiler import CompiledKernel
    return isinstance(compiled, CompiledKernel) and runner_is_plain()


def _hooks_idle() -> bool:
    """No launch hook registered (Triton 3.6 keeps them in ``HookChain``s; older: None)."""
    if knobs is None:
        return False
    rt = knobs.runtime
    return all(h is None or not getattr(h, "calls", True)
               for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def launch(fn, grid: Tuple[int, ...], *args, **meta) -> None:
    """``fn[grid](*args, **meta)`` with the kernel lookup cached: ``args`` are the kernel's
    leading runtime arguments (tensors, ints, floats) in order, ``meta`` its remaining
    parameters (constexprs) by name plus launch options (``num_warps``, ...)."""
    device = _fast_device(args[0])
    if device is None:
        fn[grid](*args, **meta)
        return
    spec, vals = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.get_device() != device:            # another GPU or not CUDA (-1): Triton's
                fn[grid](*args, **meta)             # error names it
                return
            p = a.data_ptr()
            spec.append((a.dtype, (p & 15) == 0))
            vals.append(p)
        else:
            spec.append(_int_key(a) if type(a) is int else arg_key(a))
            vals.append(a)
    # constexprs by type and value: True == 1 == 1.0 in Python, not to Triton
    key = (id(fn), device, tuple(spec), tuple(meta.items()), tuple(map(type, meta.values())))
    hit = _cache.get(key)
    if hit is None:
        compiled = fn[grid](*args, **meta)
        if hasattr(compiled, "result"):          # an asynchronous compile
            compiled = compiled.result()
        names = tuple(fn.arg_names[len(args):])  # the constexprs, in signature order
        # only runtime parameters may come by position: a positional constexpr would be keyed
        # by its divisibility alone
        positional_ok = not any(getattr(p, "is_constexpr", False) for p in fn.params[:len(args)])
        if hasattr(compiled, "__getitem__") and positional_ok and all(n in meta for n in names):
            stream = None
            if _direct(compiled):
                from triton.runtime import driver
                stream = driver.active.get_current_stream
            _cache[key] = (fn, compiled, tuple(meta[n] for n in names), stream)
        return
    _, compiled, consts, stream = hit
    g = (tuple(grid) + (1, 1))[:3]
    if stream is not None and _hooks_idle():
        compiled.run(g[0], g[1], g[2], stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *vals, *consts)
        rec = getattr(_local, "recording", None)
        if rec is not None:
            slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            rec.append(Replay(compiled, consts, stream, device, g, tuple(vals), slots))
    else:
        compiled[g](*args, *consts)


class Replay:
    """One direct launch made again with other tensors (``record``): the kernel, the grid, the
    non-tensor arguments and the constexprs are fixed; the caller passes tensors of the same
    dtypes, 16-byte alignment and device, in the order of the tensor arguments, which is what
    its own cache key must guarantee. Returns False without launching when the current device
    changed or a launch hook was registered since (the caller then takes ``launch``)."""

    __slots__ = ("compiled", "consts", "stream", "device", "grid", "vals", "slots")

    def __init__(self, compiled, consts, stream, device, grid, vals, slots):
        self.compiled, self.consts, self.stream, self.device = compiled, consts, stream, device
        self.grid, self.vals, self.slots = grid, vals, slots

    def __call__(self, *tensors) -> bool:
        if len(tensors) != len(self.slots):
            raise TypeError(f"replay takes {len(self.slots)} tensors, got {len(tensors)}")
        if _current_device() != self.device or not _hooks_idle():
            return False
        vals = list(self.vals)
        for i, t in zip(self.slots, tensors):
            vals[i] = t.data_ptr()
        c, g = self.compiled, self.grid
        c.run(g[0], g[1], g[2], self.stream(self.device), c.function, c.packed_metadata, None,
              None, None, *vals, *self.consts)
        return True


_local = threading.local()      # record() is per thread: another thread's launches stay out
replays: Dict[tuple, Replay] = {}   # callers' replay caches, keyed by the caller's own tuple


@contextmanager
def record():
    """Collect a ``Replay`` of every direct launch this thread makes inside the block (a list;
    launches through the JIT, a miss or a registered hook, add nothing)."""
    saved = getattr(_local, "recording", None)
    _local.recording = rec = []
    try:
        yield rec
    finally:
        _local.recording = saved


def clear_cache() -> None:
    """Forget every cached kernel and every replay built on one."""
    _cache.clear()
    replays.clear()
