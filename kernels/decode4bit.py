"""Decode eight 4-bit codes (one 32-bit word) into 16-bit floats with byte permutes, in Triton.

A 4-bit weight stores index ``q`` into a 16-entry table ``code`` (NF4 or FP4, QLoRA arXiv
2305.14314, section 3); decoding is ``code[q]``. Read as a little-endian 32-bit word, four packed
bytes hold eight indices in memory order e0..e7: e0 = bits 4-7 (the high nibble of byte 0 comes
first, as bitsandbytes packs), e1 = bits 0-3, e2 = bits 12-15, ..., e7 = bits 24-27.

``decode8`` returns the eight table values in the compute dtype (bfloat16 / float16 bits; any
dtype for the table path). Two implementations with identical output bits:

* table path (Triton ops; the interpreter, float32, or when the check below fails): eight
  ``tl.load(code + ((w >> s) & 15))`` gathers from the 16-entry table (one L1 line), each costing
  a 64-bit address, a load and the nibble extraction: ~5 instructions per weight.
* PRMT path (inline PTX, CUDA): the table lives in 8 registers as two byte planes (low bytes
  ``L0..L3`` and high bytes ``H0..H3`` of the 16 codes, 4 codes per register). ``prmt`` picks 4
  bytes out of 8 by 4 selector nibbles, so one ``prmt`` is 4 table lookups into half a table:

      sel  = w & 0x77777777                      (e1, e0, e3, e2 | e5, e4, e7, e6 >> 16)
      m    = prmt(w, w << 4, 0x9D8C)             byte i = 0xFF where nibble i of sel had bit 3
                                                 set (sign mode on the byte holding that bit)
      lo   = m ? prmt(L2, L3, sel) : prmt(L0, L1, sel)      (lop3)
      hi   = m ? prmt(H2, H3, sel) : prmt(H0, H1, sel)
      out  = prmt(lo, hi, 0x4051), prmt(lo, hi, 0x6273)     16-bit values e0 | e1 << 16, ...

  The interleave puts each pair back in memory order, so the nibbles need no swap: 21
  instructions for 8 weights (~2.6 each), no memory traffic. ``decode_pairs`` returns the four
  32-bit pairs as they are (the register layout of a 16-bit MMA operand); ``decode8`` splits
  them into eight 16-bit values. Its output is compared bit for
  bit with the table path on every byte value in every position (``prmt_decoder_ok``) once per
  device and dtype before the kernels use it; a mismatch or a compile error falls back to the
  table path with a warning.
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

SHIFTS = (4, 0, 12, 8, 20, 16, 28, 24)   # bit offset of e0..e7 in the word


def _prmt_ptx(pairs: bool) -> str:
    """The PRMT decoder's PTX. Eight 16-bit outputs ``$0..$7`` (e0..e7), or with ``pairs`` four
    32-bit outputs ``$0..$3`` holding (e0, e1), (e2, e3), (e4, e5), (e6, e7) low half first: the
    operand layout of a 16-bit MMA fragment register. Then the word, then planes L0..L3, H0..H3."""
    n_out = 4 if pairs else 8
    w = f"${n_out}"
    p = [f"${n_out + 1 + i}" for i in range(8)]

    def lookup(sel, mask, lo, hi):   # 4 lookups by the nibbles of sel, both planes
        return (f"prmt.b32 la, {p[0]}, {p[1]}, {sel};\nprmt.b32 lb, {p[2]}, {p[3]}, {sel};\n"
                f"prmt.b32 ha, {p[4]}, {p[5]}, {sel};\nprmt.b32 hb, {p[6]}, {p[7]}, {sel};\n"
                f"lop3.b32 {lo}, la, lb, {mask}, 0xD8;\nlop3.b32 {hi}, ha, hb, {mask}, 0xD8;\n")
    o = ["$0", "$1", "$2", "$3"] if pairs else ["o0", "o1", "o2", "o3"]
    split = "" if pairs else (
        "mov.b32 {$0, $1}, o0;\nmov.b32 {$2, $3}, o1;\nmov.b32 {$4, $5}, o2;\n"
        "mov.b32 {$6, $7}, o3;\n")
    return ("{\n.reg .b32 l4, sel, s23, m01, m23, la, lb, ha, hb, x01, y01, x23, y23, o0, o1, o2, "
            "o3;\n"
            f"shl.b32 l4, {w}, 4;\nand.b32 sel, {w}, 0x77777777;\nshr.u32 s23, sel, 16;\n"
            f"prmt.b32 m01, {w}, l4, 0x9D8C;\nprmt.b32 m23, {w}, l4, 0xBFAE;\n"
            + lookup("sel", "m01", "x01", "y01") + lookup("s23", "m23", "x23", "y23")
            + f"prmt.b32 {o[0]}, x01, y01, 0x4051;\nprmt.b32 {o[1]}, x01, y01, 0x6273;\n"
            f"prmt.b32 {o[2]}, x23, y23, 0x4051;\nprmt.b32 {o[3]}, x23, y23, 0x6273;\n"
            + split + "}")


_PRMT_ASM = tl.constexpr(_prmt_ptx(pairs=False))
_PRMT_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r")
_PAIRS_ASM = tl.constexpr(_prmt_ptx(pairs=True))
_PAIRS_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r,r,r,r,r")


@triton.jit
def table_planes(tab_ptr):
    """The 8 int32 byte-plane registers (L0..L3, H0..H3) of a table prepared by ``planes``."""
    return (tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3),
            tl.load(tab_ptr + 4), tl.load(tab_ptr + 5), tl.load(tab_ptr + 6),
            tl.load(tab_ptr + 7))


@triton.jit
def decode8(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7, USE_PRMT: tl.constexpr):
    """int32 words (any shape) -> e0..e7 of that shape in the table's dtype; t0..t7 are the
    byte planes (``table_planes``), used by the PRMT path only (16-bit tables)."""
    if USE_PRMT:
        dt = code_ptr.dtype.element_ty
        return tl.inline_asm_elementwise(_PRMT_ASM, _PRMT_CONSTRAINTS,
                                         [wd, t0, t1, t2, t3, t4, t5, t6, t7],
                                         dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True,
                                         pack=1)
    else:
        return (tl.load(code_ptr + ((wd >> 4) & 15)), tl.load(code_ptr + (wd & 15)),
                tl.load(code_ptr + ((wd >> 12) & 15)), tl.load(code_ptr + ((wd >> 8) & 15)),
                tl.load(code_ptr + ((wd >> 20) & 15)), tl.load(code_ptr + ((wd >> 16) & 15)),
                tl.load(code_ptr + ((wd >> 28) & 15)), tl.load(code_ptr + ((wd >> 24) & 15)))


@triton.jit
def decode_pairs(wd, t0, t1, t2, t3, t4, t5, t6, t7):
    """int32 words (any shape) -> four int32 of that shape: the 16-bit codes (e0, e1), (e2, e3),
    (e4, e5), (e6, e7), low half first (PRMT path only: CUDA, 16-bit table planes)."""
    return tl.inline_asm_elementwise(_PAIRS_ASM, _PAIRS_CONSTRAINTS,
                                     [wd, t0, t1, t2, t3, t4, t5, t6, t7],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def interleave8(v0, v1, v2, v3, v4, v5, v6, v7):
    """[..., Q] x 8 -> [..., Q, 8] with [..., q, k] = v_k[..., q] (join appends its axis last,
    so the tree joins e0/e4, e2/e6, ... to land e_k at 4*L1 + 2*L2 + L3 = k)."""
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)),
                   tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def _decode_check_kernel(w_ptr, code_ptr, tab_ptr, out_ptr, USE_PRMT: tl.constexpr,
                         BLOCK: tl.constexpr):
    wd = tl.load(w_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK))
    t0, t1, t2, t3, t4, t5, t6, t7 = table_planes(tab_ptr)
    v0, v1, v2, v3, v4, v5, v6, v7 = decode8(wd, code_ptr, t0, t1, t2, t3, t4, t5, t6, t7,
                                             USE_PRMT)
    e = tl.reshape(interleave8(v0, v1, v2, v3, v4, v5, v6, v7), (BLOCK * 8,))
    tl.store(out_ptr + tl.program_id(0) * BLOCK * 8 + tl.arange(0, BLOCK * 8), e)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
_PLANES: Dict[Tuple, torch.Tensor] = {}
_VERIFIED: Dict[Tuple, bool] = {}


def planes(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [8]: the low bytes then the high bytes of the 16 codes in ``dtype`` (16-bit)."""
    b = code.reshape(16).to(dtype).contiguous().view(torch.uint8).view(16, 2)
    return torch.cat([b[:, 0].contiguous().view(torch.int32),
                      b[:, 1].contiguous().view(torch.int32)])


def check_words(device) -> torch.Tensor:
    """Words with every byte value in every byte position, plus random ones (int32 [1024])."""
    i = torch.arange(256, dtype=torch.int64)
    rows = [i | ((i + 85) % 256) << 8 | ((i + 170) % 256) << 16 | ((255 - i) << 24)]
    rows.append(torch.randint(0, 2 ** 32, (768,), generator=torch.Generator().manual_seed(0)))
    w = torch.cat(rows)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32).to(device)


def prmt_decoder_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """True if the PRMT decoder matches the table decoder bit for bit on this device (cached)."""
    key = (str(device), dtype)
    if key not in _VERIFIED:
        _VERIFIED[key] = _verify(device, dtype)
    return _VERIFIED[key]


def _verify(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        words = check_words(device)
        gen = torch.Generator().manual_seed(1)
        for table in (torch.randn(16, generator=gen), torch.linspace(-1, 1, 16)):
            code = table.to(device=device, dtype=dtype)
            tab = planes(code, dtype)
            outs = []
            for use in (True, False):
                out = torch.empty(words.numel() * 8, dtype=dtype, device=device)
                _decode_check_kernel[(words.numel() // 128,)](
                    words, code, tab, out, USE_PRMT=use, BLOCK=128)
                outs.append(out.view(torch.int16))
            if not torch.equal(outs[0], outs[1]):
                warnings.warn(f"4-bit PRMT decoder disagrees with the table decoder on {device} "
                              f"({dtype}); using the table decoder")
                return False
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use the portable decoder
        warnings.warn(f"4-bit PRMT decoder unavailable on {device} ({type(e).__name__}: {e}); "
                      f"using the table decoder")
        return False
