"""QuantState: everything besides the packed nibbles that a 4-bit weight needs to be decoded.

A 4-bit weight ``W`` of shape ``shape`` (``n`` elements, QLoRA arXiv 2305.14314 section 3) is

    packed   uint8 [(n + 1) // 2, 1]   two 4-bit indices per byte, first element in the high nibble
    absmax   float32 [nb]              nb = ceil(n / blocksize), one scale per block
    code     float32 [16]              the NF4 / FP4 table (``quant_map``)

and with double quantization (QLoRA eq. 6, section 3) ``absmax`` is itself stored as

    absmax   uint8 [nb]                8-bit codes of ``absmax - offset`` in blocks of 256
    offset   float32 []                mean of the float32 absmax
    state2   absmax float32 [ceil(nb / 256)], code float32 [256] (signed dynamic map), blocksize 256

so that ``absmax_b = code2[absmax_q[b]] * absmax2[b // 256] + offset``.

Serialization follows bitsandbytes 0.50.2 exactly (``QuantState.as_dict(packed=True)``), so a
state dict written by transformers + bitsandbytes loads here and ours loads there. For a weight
under module prefix ``p``:

    {p}weight                                   packed uint8 [(n+1)//2, 1]
    {p}weight.absmax                            float32 [nb]  (uint8 when nested)
    {p}weight.quant_map                         float32 [16]
    {p}weight.nested_absmax                     float32 [ceil(nb/256)]   (nested only)
    {p}weight.nested_quant_map                  float32 [256]            (nested only)
    {p}weight.quant_state.bitsandbytes__nf4     uint8: UTF-8 of json.dumps({"quant_type",
                                                "blocksize", "dtype", "shape", and when nested
                                                "nested_blocksize", "nested_dtype",
                                                "nested_offset"}), in that key order
                                                (``__fp4`` for FP4)

Anything missing, mistyped or inconsistent is a QuantError that names the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import QuantError
from .blockwise8 import num_blocks
from .codes import QUANT_TYPES

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QS_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(eq=False)
class NestedState:
    """The 8-bit quantization of the absmax constants (bitsandbytes' ``state2``)."""

    absmax: torch.Tensor                       # float32 [ceil(nb / blocksize)]
    code: torch.Tensor                         # float32 [256]
    blocksize: int = 256
    dtype: torch.dtype = torch.float32

    def to(self, device) -> "NestedState":
        return NestedState(self.absmax.to(device), self.code.to(device), self.blocksize, self.dtype)


@dataclass(eq=False)
class QuantState:
    """Metadata of one 4-bit tensor; see the module docstring for shapes."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[torch.Tensor] = None
    state2: Optional[NestedState] = field(default=None)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def absmax2(self) -> Optional[torch.Tensor]:
        return None if self.state2 is None else self.state2.absmax

    @property
    def code2(self) -> Optional[torch.Tensor]:
        return None if self.state2 is None else self.state2.code

    @property
    def blocksize2(self) -> Optional[int]:
        return None if self.state2 is None else self.state2.blocksize

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device) -> "QuantState":
        """A copy of this state with every tensor on ``device`` (this one is left unchanged)."""
        return QuantState(
            absmax=self.absmax.to(device), shape=self.shape, dtype=self.dtype,
            blocksize=self.blocksize, quant_type=self.quant_type, code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            state2=None if self.state2 is None else self.state2.to(device))

    def check(self, what: str = "QuantState", packed: Optional[torch.Tensor] = None) -> None:
        """Raise QuantError if the fields are inconsistent with each other (and with ``packed``)."""
        if self.quant_type not in QUANT_TYPES:
            raise QuantError(f"{what}: quant_type {self.quant_type!r} is not one of {QUANT_TYPES}")
        if self.blocksize not in BLOCKSIZES_4BIT:
            raise QuantError(f"{what}: blocksize {self.blocksize!r} is not one of "
                             f"{list(BLOCKSIZES_4BIT)}")
        if self.dtype not in _DTYPE_NAMES.values():
            raise QuantError(f"{what}: dtype {self.dtype} is not float32, float16 or bfloat16")
        n = self.numel
        nb = num_blocks(n, self.blocksize)
        _expect(self.code, "code (quant_map)", what, torch.float32, 16)
        if self.nested:
            _expect(self.absmax, "absmax", what, torch.uint8, nb)
            if self.offset is None or self.offset.numel() != 1:
                raise QuantError(f"{what}: nested state needs a one-element offset tensor")
            if self.state2.blocksize <= 0:
                raise QuantError(f"{what}: nested blocksize {self.state2.blocksize} must be > 0")
            _expect(self.state2.absmax, "nested_absmax", what, torch.float32,
                    num_blocks(nb, self.state2.blocksize))
            _expect(self.state2.code, "nested_quant_map", what, torch.float32, 256)
        else:
            _expect(self.absmax, "absmax", what, torch.float32, nb)
        if packed is not None:
            if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
                raise QuantError(f"{what}: packed weight must be uint8, got "
                                 f"{getattr(packed, 'dtype', type(packed).__name__)}")
            if packed.numel() != (n + 1) // 2:
                raise QuantError(f"{what}: packed weight has {packed.numel()} bytes but shape "
                                 f"{tuple(self.shape)} needs {(n + 1) // 2}")

    # ---- bitsandbytes serialization -------------------------------------------------------
    def as_dict(self, packed: bool = True) -> Dict[str, Any]:
        """bitsandbytes' ``QuantState.as_dict``: tensors plus (packed) JSON of the rest."""
        meta: Dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            tensors["nested_absmax"] = self.state2.absmax
            tensors["nested_quant_map"] = self.state2.code.clone()
            meta.update({"nested_blocksize": self.state2.blocksize,
                         "nested_dtype": dtype_name(self.state2.dtype),
                         "nested_offset": float(self.offset.item())})
        if not packed:
            return {**tensors, **meta}
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return {**tensors, _QS_PREFIX + self.quant_type: blob}

    @classmethod
    def from_dict(cls, entries: Mapping[str, Any], device=None, what: str = "quant state",
                  key_prefix: str = "") -> "QuantState":
        """Inverse of :meth:`as_dict` (packed or not). Keys are as in ``as_dict``; errors name
        them as ``key_prefix + key`` (``what`` names the file or module)."""
        def name(k):
            return f"{what}: '{key_prefix}{k}'"

        entries = dict(entries)
        qs_keys = [k for k in entries if k.startswith(_QS_PREFIX)]
        unknown = [k for k in entries if k not in _TENSOR_KEYS and k not in qs_keys
                   and k not in _META_KEYS]
        if unknown:
            raise QuantError(f"{name(unknown[0])} is not a bitsandbytes quant-state key")
        meta = {k: entries[k] for k in _META_KEYS if k in entries}
        if qs_keys:
            if len(qs_keys) != 1:
                raise QuantError(f"{what}: expected one '{key_prefix}{_QS_PREFIX}<type>' entry, "
                                 f"found {[key_prefix + k for k in qs_keys]}")
            key = qs_keys[0]
            meta.update(_unpack_meta(entries[key], name(key)))
            suffix = key[len(_QS_PREFIX):]
            if suffix not in QUANT_TYPES or meta.get("quant_type") != suffix:
                raise QuantError(f"{name(key)}: key type {suffix!r} does not match quant_type "
                                 f"{meta.get('quant_type')!r}")
        elif "quant_type" not in meta:
            raise QuantError(f"{name(_QS_PREFIX + 'nf4')} is missing (no quant-state metadata)")
        for k in ("quant_type", "blocksize", "dtype", "shape"):
            if k not in meta:
                raise QuantError(f"{name(k)} is missing from the quant-state metadata")
        for k in ("absmax", "quant_map"):
            if not isinstance(entries.get(k), torch.Tensor):
                raise QuantError(f"{name(k)} is missing or not a tensor")
        nested = "nested_absmax" in entries or "nested_offset" in meta
        if nested:
            for k in ("nested_absmax", "nested_quant_map"):
                if not isinstance(entries.get(k), torch.Tensor):
                    raise QuantError(f"{name(k)} is missing or not a tensor")
            for k in ("nested_blocksize", "nested_dtype", "nested_offset"):
                if k not in meta:
                    raise QuantError(f"{name(k)} is missing from the quant-state metadata")

        def as_int(k):
            v = meta[k]
            if isinstance(v, bool) or not isinstance(v, int):
                raise QuantError(f"{name(k)}: expected an integer, got {v!r}")
            return v

        def as_dtype(k):
            if meta[k] not in _DTYPE_NAMES:
                raise QuantError(f"{name(k)}: dtype {meta[k]!r} is not one of {list(_DTYPE_NAMES)}")
            return _DTYPE_NAMES[meta[k]]

        shape = meta["shape"]
        if (not isinstance(shape, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise QuantError(f"{name('shape')}: expected a list of non-negative ints, got "
                             f"{shape!r}")
        state2, offset = None, None
        device = entries["absmax"].device if device is None else device
        if nested:
            off = meta["nested_offset"]
            if isinstance(off, bool) or not isinstance(off, (int, float)):
                raise QuantError(f"{name('nested_offset')}: expected a number, got {off!r}")
            offset = torch.tensor(float(off), dtype=torch.float32, device=device)
            state2 = NestedState(absmax=entries["nested_absmax"].to(device),
                                 code=entries["nested_quant_map"].to(device),
                                 blocksize=as_int("nested_blocksize"),
                                 dtype=as_dtype("nested_dtype"))
        state = cls(absmax=entries["absmax"].to(device), shape=torch.Size(shape),
                    dtype=as_dtype("dtype"), blocksize=as_int("blocksize"),
                    quant_type=meta["quant_type"], code=entries["quant_map"].to(device),
                    offset=offset, state2=state2)
        try:
            state.check(what)
        except QuantError as e:
            raise QuantError(f"{e} (keys under '{key_prefix}')") from None
        return state


_META_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
              "nested_offset")


def _expect(t, field_name: str, what: str, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise QuantError(f"{what}: {field_name} is not a tensor ({type(t).__name__})")
    if t.dtype != dtype:
        raise QuantError(f"{what}: {field_name} has dtype {t.dtype}, expected {dtype}")
    if t.numel() != numel:
        raise QuantError(f"{what}: {field_name} has {t.numel()} values, expected {numel}")


def _unpack_meta(blob, where: str) -> Dict[str, Any]:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise QuantError(f"{where}: expected a 1-D uint8 tensor of packed JSON")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantError(f"{where}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise QuantError(f"{where}: packed JSON is a {type(meta).__name__}, expected an object")
    unknown = [k for k in meta if k not in _META_KEYS]
    if unknown:
        raise QuantError(f"{where}: unknown metadata field {unknown[0]!r}")
    return meta


def weight_state_dict(packed: torch.Tensor, state: QuantState,
                      prefix: str = "") -> Dict[str, torch.Tensor]:
    """``{prefix}weight`` and ``{prefix}weight.<quant-state key>`` entries, as bitsandbytes
    saves them."""
    out = {prefix + "weight": packed}
    for k, v in state.as_dict(packed=True).items():
        out[prefix + "weight." + k] = v
    return out


def quant_state_keys(state_dict: Mapping[str, Any], prefix: str = "") -> Tuple[str, ...]:
    """The keys of ``state_dict`` that belong to the quant state of ``{prefix}weight``."""
    head = prefix + "weight."
    return tuple(k for k in state_dict if k.startswith(head))


def load_weight_state_dict(state_dict: Mapping[str, Any], prefix: str = "", device=None,
                           what: str = "state dict") -> Tuple[torch.Tensor, QuantState]:
    """Read ``{prefix}weight`` and its quant state -> ``(packed uint8 [(n+1)//2, 1], state)``.

    A packed weight stored in another dtype (bitsandbytes' ``quant_storage``, e.g. bfloat16 for
    FSDP) is reinterpreted as its bytes.
    """
    wkey = prefix + "weight"
    if wkey not in state_dict:
        raise QuantError(f"{what}: '{wkey}' is missing")
    packed = state_dict[wkey]
    if not isinstance(packed, torch.Tensor):
        raise QuantError(f"{what}: '{wkey}' is not a tensor")
    if packed.dtype != torch.uint8:
        if packed.dtype.is_floating_point and packed.element_size() > 1:
            packed = packed.contiguous().view(torch.uint8)
        else:
            raise QuantError(f"{what}: '{wkey}' has dtype {packed.dtype}, expected packed uint8")
    head = wkey + "."
    entries = {k[len(head):]: state_dict[k] for k in quant_state_keys(state_dict, prefix)}
    state = QuantState.from_dict(entries, device=device, what=what, key_prefix=head)
    packed = packed.reshape(-1, 1).to(device)
    try:
        state.check(what, packed)
    except QuantError as e:
        raise QuantError(f"{e} ('{wkey}')") from None
    return packed, state
