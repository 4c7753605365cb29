"""Host-side helpers shared by the QLoRA 4-bit matmul launchers (Dettmers et al. 2023, arXiv
2305.14314; ``matmul4bit.py`` and the mma kernel's launcher in ``matmul4bit_mma.py``): sizes,
split-K buffers, the 16-bit code tables."""
from __future__ import annotations

import weakref
from typing import Dict, Tuple

import torch

from . import tuning
from .decode4bit import planes

MAX_SPLIT = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)            # (triton.cdiv is a jit function: slow on the host)


def _interpreting() -> bool:
    return tuning._INTERPRET        # one definition: read when the kernel modules import


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


_COUNTERS: Dict[Tuple, torch.Tensor] = {}
_TABLES: Dict[Tuple, tuple] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters (the split-K epilogue leaves them at zero again)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _workspace(splits: int, M: int, N: int, device: torch.device) -> torch.Tensor:
    """float32 partial tiles [splits, M, N] for split-K (a 1-element stand-in without split)."""
    return torch.empty((splits, M, N) if splits > 1 else (1,), dtype=torch.float32, device=device)


def _tables(code: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(16-bit table [16]: ``dtype``, float16 for float32; its PRMT byte planes int32 [8]) of
    ``code``, cached per live table object, version and dtype: no conversion kernel per call (a
    dead table's reused id never matches its weakref)."""
    key = (id(code), dtype)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    dtype = torch.float16 if dtype == torch.float32 else dtype
    table = code.reshape(16).to(dtype).contiguous()
    tab = planes(table, dtype)
    _cache_put(_TABLES, key, (weakref.ref(code), code._version, (table, tab)))
    return table, tab


def _cache_put(cache: dict, key, value) -> None:
    """Keep a derived table for later calls, except inside a CUDA graph capture: there the
    kernels that compute it are only recorded, so eager calls would read garbage."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    if len(cache) > 256:
        cache.clear()
    cache[key] = value
