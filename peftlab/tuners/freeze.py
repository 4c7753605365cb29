"""Freeze tuning and BitFit: train a chosen subset of the model's own parameters.

Freeze tuning trains whole decoder layers and leaves the rest frozen (the "partial fine-tuning" /
"top-k layers" baseline, e.g. Lee et al. 2019, arXiv 1911.03090; LLaMA-Factory's `freeze`):

    FreezeConfig(trainable_layers=2)                         the last 2 decoder layers
    FreezeConfig(trainable_layers=-2)                        the first 2
    FreezeConfig(trainable_layers=2, trainable_modules=["mlp"])          only their MLPs
    FreezeConfig(trainable_layers=0, extra_modules=["model.norm", "lm_head"])

`trainable_modules` names submodules inside a layer ("mlp", "self_attn.q_proj", "input_layernorm"),
matched exactly or by "." suffix; `extra_modules` names modules anywhere in the model the same way.

BitFit (Ben Zaken et al. 2021, arXiv 2106.10199, §2) trains only the bias terms b of every
y = W x + b (the paper also trains subsets, e.g. only the query and MLP-intermediate biases, hence
`bias_modules`). Llama has no biases; Qwen2 has them on q/k/v. A model without any is a
`ConfigError`, never a run that trains nothing.

Files: `save_adapter` writes the trained tensors under the model's own parameter names
(`model.layers.1.mlp.up_proj.weight`) to adapter_model.safetensors, and our own
adapter_config.json ({"peft_type": "FREEZE", "trainable_layers": 2, ...}). HF PEFT has no such
method and cannot read these files; `load_adapter` restores them onto a fresh base model and checks
that exactly the expected tensors, with the expected shapes, are present.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..configs import from_dict
from ..errors import AdapterError, ConfigError
from .lora_layers import is_quantized


@dataclass
class FreezeConfig:
    """Train the last `trainable_layers` decoder layers (first |n| when negative); see module doc."""

    trainable_layers: int = 2
    trainable_modules: Union[str, List[str]] = "all"
    extra_modules: List[str] = field(default_factory=list)
    base_model_name_or_path: Optional[str] = None

    peft_type: ClassVar[str] = "FREEZE"

    def __post_init__(self):
        if isinstance(self.trainable_layers, bool) or not isinstance(self.trainable_layers, int):
            raise ConfigError(f"FreezeConfig: field 'trainable_layers' must be an integer, got {self.trainable_layers!r}")
        tm = self.trainable_modules
        if not (tm == "all" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm))):
            raise ConfigError(f"FreezeConfig: field 'trainable_modules' must be 'all' or a non-empty list of "
                              f"module names, got {tm!r}")
        em = self.extra_modules
        if not (isinstance(em, (list, tuple)) and all(isinstance(t, str) and t for t in em)):
            raise ConfigError(f"FreezeConfig: field 'extra_modules' must be a list of module names, got {em!r}")
        if self.trainable_layers == 0 and not self.extra_modules:
            raise ConfigError("FreezeConfig: trainable_layers = 0 and no extra_modules: nothing would train")

    def to_peft_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d


@dataclass
class BitFitConfig:
    """Train only biases (all of them, or those of modules named in `bias_modules`)."""

    bias_modules: Union[str, List[str]] = "all"
    base_model_name_or_path: Optional[str] = None

    peft_type: ClassVar[str] = "BITFIT"

    def __post_init__(self):
        bm = self.bias_modules
        if not (bm == "all" or (isinstance(bm, (list, tuple)) and bm and all(isinstance(t, str) and t for t in bm))):
            raise ConfigError(f"BitFitConfig: field 'bias_modules' must be 'all' or a non-empty list of module "
                              f"names, got {bm!r}")

    def to_peft_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = self.peft_type
        return d


def _matches(name: str, specs) -> bool:
    return any(name == s or name.endswith("." + s) for s in specs)


def _decoder_layers(model: nn.Module):
    """(prefix, ModuleList) of the decoder layers: `model.layers` in Llama-family models."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return name, m
    raise ConfigError(f"FreezeConfig: {type(model).__name__} has no decoder layer list named 'layers'")


def _module_params(prefix: str, module: nn.Module, seen: set, out: Dict[str, nn.Parameter]) -> None:
    for sub, m in module.named_modules(prefix=prefix):
        if is_quantized(m):
            raise ConfigError(f"FreezeConfig: '{sub}' is stored in 4 bits and cannot train; freeze tuning "
                              "needs a full-precision base")
    for pname, p in module.named_parameters(prefix=prefix):
        if id(p) not in seen:
            seen.add(id(p))
            out[pname] = p


def trainable_tensors(model: nn.Module, config) -> Dict[str, nn.Parameter]:
    """Parameter name -> parameter that `config` trains (ConfigError if that set is empty or ill-named)."""
    out: Dict[str, nn.Parameter] = {}
    seen: set = set()
    if isinstance(config, BitFitConfig):
        names = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
        if not names:
            raise ConfigError(f"BitFitConfig: {type(model).__name__} has no bias parameters, so BitFit would "
                              "train nothing (Llama has none; Qwen2 has q/k/v biases)")
        if config.bias_modules != "all":
            names = [n for n in names if _matches(n[: -len(".bias")], config.bias_modules)]
            if not names:
                owners = sorted({n[: -len(".bias")].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
                                 if n.endswith(".bias")})
                raise ConfigError(f"BitFitConfig: bias_modules {config.bias_modules} match no module with a bias; "
                                  f"modules with biases: {', '.join(owners)}")
        params = dict(model.named_parameters())
        return {n: params[n] for n in names}
    prefix, layers = _decoder_layers(model)
    n, L = config.trainable_layers, len(layers)
    if abs(n) > L:
        raise ConfigError(f"FreezeConfig: trainable_layers = {n} but the model has {L} decoder layers")
    chosen = range(L - n, L) if n > 0 else range(0, -n)
    for i in chosen:
        layer = layers[i]
        if config.trainable_modules == "all":
            _module_params(f"{prefix}.{i}", layer, seen, out)
            continue
        for spec in config.trainable_modules:
            hits = [(rel, m) for rel, m in layer.named_modules() if rel and _matches(rel, [spec])]
            if not hits:
                avail = sorted({rel for rel, _ in layer.named_modules() if rel})
                raise ConfigError(f"FreezeConfig: trainable_modules entry '{spec}' matches nothing in decoder "
                                  f"layer {i}; available: {', '.join(avail)}")
            for rel, m in hits:
                _module_params(f"{prefix}.{i}.{rel}", m, seen, out)
    for spec in config.extra_modules:
        hits = [(name, m) for name, m in model.named_modules() if name and _matches(name, [spec])]
        if not hits:
            top = sorted(name for name, m in model.named_modules() if name and name.count(".") <= 1)
            raise ConfigError(f"FreezeConfig: extra_modules entry '{spec}' matches no module; e.g. {', '.join(top)}")
        for name, m in hits:
            _module_params(name, m, seen, out)
    return out


def apply(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Freeze everything except the tensors `config` selects."""
    if not isinstance(config, (FreezeConfig, BitFitConfig)):
        raise ConfigError(f"expected a FreezeConfig or BitFitConfig, got {type(config).__name__}")
    if getattr(model, "peft_config", None):
        raise ConfigError(f"the model already carries adapter(s) {list(model.peft_config)}; "
                          f"{config.peft_type} applies to a plain base model")
    chosen = trainable_tensors(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    model.peft_config = {adapter_name: config}
    model.active_adapter = adapter_name
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    config = model.peft_config[adapter_name]
    return {k: p.detach() for k, p in trainable_tensors(model, config).items()}


def check_adapter_fits(model: nn.Module, config, sd: Dict[str, torch.Tensor], source: str) -> None:
    """The file holds exactly the tensors `config` selects on this base, with the same shapes."""
    try:
        expected = trainable_tensors(model, config)
    except ConfigError as e:
        raise AdapterError(f"{source}: the adapter does not fit this base model: {e}") from None
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise AdapterError(f"{source}: tensor '{extra[0]}' is not trained by this {config.peft_type} config "
                           f"on this base model ({len(extra)} such tensor(s))")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise AdapterError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise AdapterError(f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the base model has "
                               f"{tuple(expected[k].shape)}")
        if not t.is_floating_point():
            raise AdapterError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type")


def load_adapter_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], adapter_name: str = "default",
                            source: str = "adapter") -> None:
    config = model.peft_config[adapter_name]
    check_adapter_fits(model, config, sd, source)
    expected = trainable_tensors(model, config)
    with torch.no_grad():
        for k, t in sd.items():
            expected[k].copy_(t.to(expected[k].dtype))


def config_from_peft_dict(d: Dict[str, Any], source: str = "adapter_config.json"):
    kind = d.get("peft_type")
    cls = {"FREEZE": FreezeConfig, "BITFIT": BitFitConfig}.get(kind)
    if cls is None:
        raise ConfigError(f"{source}: field 'peft_type' is {kind!r}, expected 'FREEZE' or 'BITFIT'")
    return from_dict(cls, {k: v for k, v in d.items() if k != "peft_type"}, source)
