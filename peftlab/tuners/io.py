"""Adapters on disk in the Hugging Face PEFT format.

    out_dir/adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
    out_dir/adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...
                                       (prompt methods: prompt_embeddings)

`save_adapter` writes both atomically; `load_adapter` reads them onto a fresh base model,
checking that the adapter fits it (targets exist, shapes agree) before anything is changed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch.nn as nn

from ..errors import AdapterError, ConfigError
from ..fileio import load_safetensors, read_json, save_safetensors, write_json
from . import get_peft_model, method_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: nn.Module, out_dir: os.PathLike | str, adapter_name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter `adapter_name` (default: the only/active one) of a PEFT model."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise AdapterError("save_adapter: the model has no adapter (call get_peft_model first)")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            raise AdapterError(f"save_adapter: adapters {list(active)} are active together; pass adapter_name")
        adapter_name = active or next(iter(configs))
    if adapter_name not in configs:
        raise AdapterError(f"save_adapter: no adapter named '{adapter_name}' (have {', '.join(configs)})")
    config = configs[adapter_name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mod = method_module(config.peft_type)
    if hasattr(mod, "adapter_export"):  # the method decides what goes on disk (e.g. PiSSA conversion)
        tensors, meta = mod.adapter_export(model, adapter_name)
    else:
        tensors, meta = mod.adapter_state_dict(model, adapter_name), config.to_peft_dict()
    meta["peft_type"] = config.peft_type
    meta["base_model_name_or_path"] = base_model_name_or_path or meta.get("base_model_name_or_path") \
        or getattr(model, "name_or_path", None)
    save_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(out / ADAPTER_CONFIG, meta)
    return out


def read_adapter_config(adapter_dir: os.PathLike | str):
    """Parse adapter_config.json into the matching peftlab config class."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    d = read_json(path, "adapter config")
    if not isinstance(d, dict) or "peft_type" not in d:
        raise ConfigError(f"{path}: missing field 'peft_type'")
    mod = method_module(d["peft_type"])
    return mod.config_from_peft_dict(d, str(path))


def load_adapter(model: nn.Module, adapter_dir: os.PathLike | str, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Apply the adapter saved in `adapter_dir` to `model` (a fresh base) and return the result."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{weights}: adapter weights not found")
    sd = load_safetensors(weights)
    mod = method_module(config.peft_type)
    if hasattr(mod, "check_adapter_fits"):  # refuse a misfit before the model is changed
        mod.check_adapter_fits(model, config, sd, str(weights))
    model = get_peft_model(model, config, adapter_name)
    mod.load_adapter_state_dict(model, sd, adapter_name, str(weights))
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
