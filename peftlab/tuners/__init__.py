"""PEFT methods: one file each, one entry point.

    model = get_peft_model(model, LoraConfig(...))          # lora.py     (in place)
    model = get_peft_model(model, PromptTuningConfig(...))  # prompt.py   (wraps the model)
    model = get_peft_model(model, PrefixTuningConfig(...))  # prefix.py   (wraps the model)
    model = get_peft_model(model, FreezeConfig(...))        # freeze.py   (in place)

Each method module registers itself in `METHODS` under its PEFT type and provides:

    apply(model, config, adapter_name) -> model            inject / wrap, freeze the base
    adapter_state_dict(model, adapter_name) -> {key: t}    Hugging Face PEFT key names
    load_adapter_state_dict(model, sd, adapter_name, source)
    config_from_peft_dict(d, source) -> config             adapter_config.json -> our config

and optionally (io.py uses them when present):

    check_adapter_fits(model, config, sd, source)          raise AdapterError before anything changes
    adapter_export(model, adapter_name) -> (sd, config dict)   what save_adapter writes

and its config class provides `peft_type` and `to_peft_dict()` (HF PEFT field names).
The model that comes back carries `peft_config: {adapter_name: config}`.
"""
from __future__ import annotations

import importlib
from typing import Dict

import torch
import torch.nn as nn

from ..errors import ConfigError

# PEFT type -> module that implements it (imported lazily).
METHODS: Dict[str, str] = {
    "LORA": "peftlab.tuners.lora",
    "PROMPT_TUNING": "peftlab.tuners.prompt",
    "P_TUNING": "peftlab.tuners.prompt",
    "PREFIX_TUNING": "peftlab.tuners.prefix",
    "FREEZE": "peftlab.tuners.freeze",
    "BITFIT": "peftlab.tuners.freeze",
}


def method_module(peft_type: str):
    if peft_type not in METHODS:
        raise ConfigError(f"unknown peft_type '{peft_type}' (known: {', '.join(METHODS)})")
    return importlib.import_module(METHODS[peft_type])


def get_peft_model(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Apply the PEFT method described by `config` to `model`; only its parameters stay trainable."""
    peft_type = getattr(config, "peft_type", None)
    if peft_type is None:
        raise ConfigError(f"{type(config).__name__} is not a PEFT config")
    return method_module(peft_type).apply(model, config, adapter_name)


def _lora():
    return importlib.import_module("peftlab.tuners.lora")


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    """Fold active LoRA adapters into the base weights (W0 += scale * B A); see lora.py."""
    _lora().merge_adapter(model, safe_merge=safe_merge)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter`, restoring W0."""
    _lora().unmerge_adapter(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge LoRA adapters and replace every LoRA layer with a plain linear layer."""
    return _lora().merge_and_unload(model)


def trainable_parameters_report(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: p' (shared tensors counted once).

    Packed 4-bit weights (a Linear4bit keeps them as a uint8 buffer, or as a frozen float
    parameter for FSDP) count as the number of weights they hold, not as their storage elements.
    """
    from .lora_layers import is_quantized

    packed = {id(m.weight): m.quant_state.numel for m in model.modules()
              if is_quantized(m) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    seen, total, trainable = set(packed), sum(packed.values()), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() if p.is_floating_point() else 0
            trainable += p.numel() if p.requires_grad else 0
    pct = 100.0 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
