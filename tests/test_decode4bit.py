"""The 4-bit word decoder (kernels/decode4bit.py).

The PRMT path is inline PTX (GPU only); here its instruction sequence is executed by a small
emulator of the PTX semantics it uses (prmt default mode with sign replication, lop3 truth
tables, shifts), and compared with plain table lookups on every byte value in every position.
The table path and the e0..e7 -> memory-order interleave run in the Triton kernel (interpreted
on the CPU). On a GPU the on-device bit-exact check must pass.
"""
import re

import pytest
import torch

from peftlab.kernels import decode4bit as d

CUDA = torch.cuda.is_available()
M32 = 0xFFFFFFFF


def prmt(a, b, c):
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = src[sel & 7]
        if sel & 8:                                   # sign mode: replicate the byte's msb
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def lop3(a, b, c, lut):
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i
               for i in range(32))


def run_ptx(word, plane_words, asm=None):
    """Execute a decoder's PTX on one word: the eight 16-bit outputs e0..e7 (``decode8``'s
    program) or, for ``decode_pairs``' program, its four 32-bit outputs split low half first."""
    asm = asm or d._PRMT_ASM.value
    n_out = 4 if asm == d._PAIRS_ASM.value else 8
    regs = {f"${i + n_out}": v & M32 for i, v in enumerate([word] + plane_words)}
    outs = {}

    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32":
            lo, hi, src = re.match(r"\{(\$\d+),\s*(\$\d+)\},\s*(\w+)", rest).groups()
            outs[lo], outs[hi] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        v = [val(t) for t in args]
        regs[dst] = {"shr.u32": lambda: v[0] >> v[1], "shl.b32": lambda: v[0] << v[1],
                     "and.b32": lambda: v[0] & v[1], "prmt.b32": lambda: prmt(*v),
                     "lop3.b32": lambda: lop3(*v)}[op]() & M32
    if n_out == 4:
        return [h for i in range(4) for h in (regs[f"${i}"] & 0xFFFF, regs[f"${i}"] >> 16)]
    return [outs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("pairs", [False, True])
def test_prmt_program_equals_table_lookup_on_every_byte_in_every_position(pairs):
    asm = d._PAIRS_ASM.value if pairs else d._PRMT_ASM.value
    words = [w & M32 for w in d.check_words("cpu").tolist()] + [0, M32, 0x88888888, 0x77777777]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        table = torch.randint(0, 1 << 16, (16,), generator=gen).tolist()
        lo = [t & 0xFF for t in table]
        hi = [t >> 8 for t in table]
        plane_words = [sum(p[4 * q + i] << 8 * i for i in range(4)) for p in (lo, hi)
                       for q in range(4)]
        for w in words[::3]:
            assert run_ptx(w, plane_words, asm) == [table[(w >> s) & 15] for s in d.SHIFTS], \
                hex(w)


def test_planes_split_low_and_high_bytes():
    code = torch.tensor([0.5, -1.0] + [0.0] * 14)
    p = d.planes(code, torch.float16).tolist()
    bits = code.half().view(torch.int16).tolist()
    assert p[0] & 0xFFFF == (bits[0] & 0xFF) | (bits[1] & 0xFF) << 8     # low bytes of c0, c1
    assert p[4] & 0xFFFF == ((bits[0] >> 8) & 0xFF) | ((bits[1] >> 8) & 0xFF) << 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_table_decoder_returns_memory_order(dtype):
    dev = "cuda" if CUDA else "cpu"
    words = d.check_words(dev)
    code = torch.randn(16).to(device=dev, dtype=dtype)
    out = torch.empty(words.numel() * 8, dtype=dtype, device=dev)
    d._decode_check_kernel[(words.numel() // 128,)](words, code, d.planes(code, dtype), out,
                                                    USE_PRMT=False, BLOCK=128)
    b = words.cpu().view(torch.uint8).long()          # little endian: bytes in memory order
    idx = torch.stack([b >> 4, b & 15], 1).reshape(-1)   # high nibble first
    assert torch.equal(out.cpu(), code.cpu()[idx])


def test_prmt_decoder_verified_where_it_can_run():
    assert d.prmt_decoder_ok(torch.device("cpu"), torch.bfloat16) is False
    if CUDA:    # the GPU's own bit-exact check (falls back with a warning if it fails)
        dev = torch.device("cuda")
        assert d.prmt_decoder_ok(dev, torch.bfloat16) and d.prmt_decoder_ok(dev, torch.float16)
