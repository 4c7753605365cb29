"""How optimizer states are packed into fixed-size chunks, the unit that is paged.

A chunk is one contiguous byte buffer holding the states of one or more parameter *segments*
(a segment is a contiguous slice of one parameter; a large parameter is split over several
chunks, many small ones share a chunk). All segments of a chunk have the same parameter dtype
and the same state format, so one kernel launch updates the whole chunk.

32-bit chunk of S segments, n_s elements each, N = sum(pad8(n_s)) state elements:

    bytes: [ m: float32[N] | v: float32[N] ]                 8 bytes per parameter

8-bit chunk, B = sum(ceil(n_s / 256)) quantization blocks (Dettmers et al. 2021, arXiv 2110.02861,
Sec. 2.1):

    bytes: [ absmax_m: f32[B] | absmax_v: f32[B] | q_m: u8[256 B] | q_v: u8[256 B] ]
                                                              2 + 8/256 bytes per parameter

Each segment starts at a multiple of 8 elements (32-bit) or of a 256-block (8-bit) inside the
chunk, and splits of a parameter fall on such boundaries, so the 256-blocks of a parameter are
the same whether or not it is split, and every offset the kernel computes is 32-byte aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from ..errors import ConfigError
from .adamw_reference import QUANT_BLOCK

ALIGN = 8                      # 32-bit segments start at multiples of 8 elements
BYTES_PER_ELEM_32 = 8          # m + v, float32
BYTES_PER_QBLOCK_8 = 2 * QUANT_BLOCK + 2 * 4  # two code blocks + two absmax
MIN_CHUNK_BYTES = 1024


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class Segment:
    """Elements [start, start + length) of parameter `param`, at `state_off` in its chunk.

    state_off counts elements (32-bit chunks) or 256-blocks (8-bit chunks).
    """

    param: int
    start: int
    length: int
    state_off: int


@dataclass
class Chunk:
    index: int
    bits: int                  # 32 or 8
    dtype: torch.dtype         # parameter dtype of every segment
    segments: List[Segment] = field(default_factory=list)
    used: int = 0              # state elements (32-bit) or 256-blocks (8-bit) in use

    @property
    def nbytes(self) -> int:
        if self.bits == 32:
            return self.used * BYTES_PER_ELEM_32
        return self.used * BYTES_PER_QBLOCK_8

    def views(self, buf: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Typed views of a uint8 buffer holding this chunk (at least `nbytes` long)."""
        u = self.used
        if self.bits == 32:
            f = buf[: 8 * u].view(torch.float32)
            return {"m": f[:u], "v": f[u:]}
        absmax = buf[: 8 * u].view(torch.float32)
        codes = buf[8 * u: self.nbytes]
        n = u * QUANT_BLOCK
        return {"am": absmax[:u], "av": absmax[u:], "qm": codes[:n], "qv": codes[n:]}

    def segment_table(self) -> torch.Tensor:
        """int64 [S, 2]: (state offset in units of 8 elements or 256-blocks, length)."""
        unit = ALIGN if self.bits == 32 else 1
        return torch.tensor([[s.state_off // unit, s.length] for s in self.segments],
                            dtype=torch.int64)

    def block_table(self, block: int) -> torch.Tensor:
        """int32 [n_programs, 2]: (segment, block index within the segment) per kernel program."""
        counts = torch.tensor([-(-s.length // block) for s in self.segments], dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(len(self.segments)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        within = torch.arange(seg.numel()) - first
        return torch.stack([seg, within], 1).to(torch.int32)


def capacity(bits: int, chunk_bytes: int) -> int:
    """State units one chunk of `chunk_bytes` holds: elements (32-bit) or 256-blocks (8-bit)."""
    if bits == 32:
        return chunk_bytes // BYTES_PER_ELEM_32 // ALIGN * ALIGN
    return chunk_bytes // BYTES_PER_QBLOCK_8


def plan_chunks(params: Sequence[Tuple[int, int, torch.dtype, int]], chunk_bytes: int) -> List[Chunk]:
    """Pack parameters into chunks.

    params: (param index, numel, dtype, state bits) in optimizer order. Parameters are packed in
    that order into one open chunk per (bits, dtype); a parameter that does not fit the open
    chunk fills it and continues in the next.
    """
    if chunk_bytes < MIN_CHUNK_BYTES:
        raise ConfigError(f"PagedAdamW: chunk_bytes={chunk_bytes} is too small; "
                          f"use at least {MIN_CHUNK_BYTES} bytes")
    chunks: List[Chunk] = []
    open_: Dict[Tuple[int, torch.dtype], Chunk] = {}
    for index, numel, dtype, bits in params:
        cap = capacity(bits, chunk_bytes)
        elems_per_unit = 1 if bits == 32 else QUANT_BLOCK
        start = 0
        while start < numel:
            chunk = open_.get((bits, dtype))
            if chunk is None or chunk.used >= cap:
                chunk = Chunk(index=len(chunks), bits=bits, dtype=dtype)
                chunks.append(chunk)
                open_[(bits, dtype)] = chunk
            length = min(numel - start, (cap - chunk.used) * elems_per_unit)
            chunk.segments.append(Segment(param=index, start=start, length=length,
                                          state_off=chunk.used))
            chunk.used += _pad(length, ALIGN) if bits == 32 else _pad(length, QUANT_BLOCK) // QUANT_BLOCK
            start += length
    return chunks
