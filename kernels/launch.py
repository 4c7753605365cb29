"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

Triton's JIT launch does, on every call: bind the arguments, derive the kernel's
*specialization* from each of them (a tensor's dtype and whether its address is 16-byte
aligned; an integer's width, whether it is divisible by 16, whether it equals 1), build a cache
key from that and the stringified options, look the compiled kernel up, check the globals it
captured, and only then call the compiled launcher. Skipping that measured 5-17 us less host
time per ``quantize_4bit`` call (two launches) and 1-7 us per ``dequantize_4bit`` call on the
H200's hosts (``experiments/quant_probe.py``, interleaved A/B); the C launcher and torch's own
ops are the rest.

``launch(fn, grid, *args, **meta)`` keeps its own cache per kernel: the key is the same
properties of the runtime arguments, computed in a few attribute reads per argument (``arg_key``;
``tests/test_launch.py`` checks on a battery of values that it separates everything Triton's
own specializer separates), plus the constexprs and options in ``meta`` and the device. A miss
launches through the JIT (which compiles or finds the kernel) and keeps the CompiledKernel it
returns; a hit calls that kernel's launcher (``compiled[grid](*all_args)``, the API Triton
documents for compiled kernels). The interpreter (``TRITON_INTERPRET=1``), CPU tensors, a
Triton without the API, and ``PEFTLAB_FAST_LAUNCH=0`` take the JIT path every time.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from .tuning import _interpreting

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


def _fast_device(first) -> Optional[int]:
    """The current CUDA device when the cached path may serve a launch whose first argument is
    ``first`` (a CUDA tensor, not interpreting, not switched off), else None."""
    if (isinstance(first, torch.Tensor) and not _interpreting(first)
            and os.environ.get("PEFTLAB_FAST_LAUNCH", "1") != "0"):
        return torch.cuda.current_device()
    return None


_cache: Dict[tuple, Tuple[Any, Tuple[str, ...]]] = {}


def launch(fn, grid: Tuple[int, ...], *args, **meta) -> None:
    """``fn[grid](*args, **meta)`` with the kernel lookup cached: ``args`` are the kernel's
    leading runtime arguments (tensors, ints, floats) in order, ``meta`` its remaining
    parameters (constexprs) by name plus launch options (``num_warps``, ...)."""
    device = _fast_device(args[0])
    if device is None:
        fn[grid](*args, **meta)
        return
    # constexprs by type and value: True == 1 == 1.0 in Python, not to Triton
    key = (fn, device, tuple(map(arg_key, args)),
           tuple((k, type(v), v) for k, v in meta.items()))
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
            _cache[key] = (compiled, names)
        return
    compiled, names = hit
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    compiled[grid3](*args, *[meta[n] for n in names])


def clear_cache() -> None:
    _cache.clear()
