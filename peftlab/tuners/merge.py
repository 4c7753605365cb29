"""`peftlab merge BASE ADAPTER OUT`: fold a saved adapter into a standalone checkpoint.

The base loads in float32, the adapter (LoRA/DoRA in HF PEFT format, or our FREEZE/BITFIT files)
is applied, LoRA is merged (W = W0 + s B A, or the DoRA form; refusing NaN/inf), and the result is
written as a Hugging Face checkpoint in the base's stored dtype, with its tokenizer. A
modules_to_save copy of lm_head on a tied-embedding base unties the two (the config says so).
Prompt-style adapters have no weights to fold and are refused, as is a 4-bit base (merge into the
full-precision checkpoint instead).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..fileio import read_json

MERGEABLE = ("LORA", "FREEZE", "BITFIT")


def merge_to_checkpoint(base_dir: os.PathLike | str, adapter_dir: os.PathLike | str,
                        out_dir: os.PathLike | str) -> Path:
    """Write base + adapter, merged, to `out_dir`; returns the output path."""
    from ..models.hf_io import load_pretrained, save_pretrained
    from . import lora
    from .io import load_adapter, read_adapter_config

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_adapter_config(adapter_dir)
    if config.peft_type not in MERGEABLE:
        raise ConfigError(f"{Path(adapter_dir) / 'adapter_config.json'}: a {config.peft_type} adapter adds "
                          f"virtual tokens and cannot be merged into weights (mergeable: {', '.join(MERGEABLE)})")
    raw = read_json(base_dir / "config.json", "config.json")
    if isinstance(raw.get("quantization_config"), dict):
        raise CheckpointError(f"{base_dir / 'config.json'}: the base is quantized; merge into the "
                              "full-precision checkpoint instead")
    stored = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    out_dtype = getattr(torch, str(stored), None)
    if not isinstance(out_dtype, torch.dtype):
        raise CheckpointError(f"{base_dir / 'config.json'}: unknown dtype {stored!r}")
    model, tok = load_pretrained(base_dir, dtype=torch.float32)
    model = load_adapter(model, adapter_dir)
    if config.peft_type == "LORA":
        lora.merge_and_unload(model, safe_merge=True)
    else:
        del model.peft_config, model.active_adapter
    return save_pretrained(model, out_dir, tokenizer=tok, dtype=out_dtype)
