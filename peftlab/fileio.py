"""Files in and out: atomic writes, checked safetensors and JSON reads.

Everything peftlab writes goes through `atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and only then renamed over the target, so a run killed mid-write
leaves the previous file intact. Everything it reads is checked: a truncated or corrupt file is a
`CheckpointError` naming the file, never a bare traceback from deep inside a library. No pickle.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from .errors import CheckpointError, ConfigError


@contextmanager
def atomic_write(path: os.PathLike | str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: os.PathLike | str, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: os.PathLike | str, what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file is a `ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def save_safetensors(tensors: Dict[str, torch.Tensor], path: os.PathLike | str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Save tensors to a safetensors file atomically (contiguous CPU copies, shared storage split)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() if _shares_storage(v) else
            v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(flat, metadata=metadata)
    with atomic_write(path, "wb") as f:
        f.write(data)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def safetensors_header(path: os.PathLike | str) -> Dict[str, Any]:
    """Parse and validate a safetensors header without reading the tensor data.

    Checks that the header is well-formed JSON and that every tensor's byte range lies inside the
    file, so a truncated download is reported by name rather than as a crash later.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file "
                                  f"(header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor '{name}'") from None
        if end > data_bytes or start > end:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor '{name}' needs bytes "
                                  f"{start}..{end} of the data section, which has {data_bytes}")
    return header


def load_safetensors(path: os.PathLike | str, device: str | torch.device = "cpu") -> Dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file after validating its header."""
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None


def safetensors_metadata(path: os.PathLike | str) -> Dict[str, str]:
    """The `__metadata__` string map of a safetensors file (empty if none)."""
    return dict(safetensors_header(path).get("__metadata__", {}) or {})
