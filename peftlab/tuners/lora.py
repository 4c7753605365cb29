"""LoRA on a whole model: injection, named adapters, merging, and the HF PEFT file format.

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

replaces each target layer in place by a `LoraLinear` / `LoraEmbedding` (lora_layers.py) holding the
original as `base_layer`, freezes everything else, and records `model.peft_config[name]` and
`model.active_adapter`. The update of a d_out × d_in weight costs r (d_in + d_out) parameters
instead of d_in d_out (Hu et al. 2021, arXiv 2106.09685, §4.1); for GPT-3 175B with r = 1 on
W_q and W_v that is 2 · 96 layers · 2 · 12288 = 4,718,592 (Table 15).

Several adapters can live on one model (`add_adapter`, `set_adapter`, `delete_adapter`); the
`disable_adapters(model)` context runs the base model alone. `merge_adapter` folds the active
adapters into the base weights (outputs unchanged), `unmerge_adapter` restores them exactly,
`merge_and_unload` leaves a plain model.

Saved adapters use HF PEFT's keys: the model's parameter name under `base_model.model.`, without the
adapter name (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
`...q_proj.lora_magnitude_vector`, modules_to_save as `base_model.model.lm_head.weight`, biases of
targeted layers as `...q_proj.base_layer.bias`). A "pissa" adapter is saved as is (loading re-runs
the deterministic SVD, as PEFT does); a "pissa_niter_N" adapter, whose residual depends on a random
draw, is saved converted to an equivalent plain LoRA adapter of rank 2r on the original weights:
s B' A' - s B0 A0 = s [B', -B0] [A'; A0].

LoRA+ (Hayou et al. 2024, arXiv 2402.12354, §3): B learns `ratio` times faster than A;
`lora_plus_param_groups` builds the optimizer groups as PEFT's `create_loraplus_optimizer` does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from .lora_config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig, config_from_peft_dict  # noqa: F401
from .lora_layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

PREFIX = "base_model.model."
EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT also saves these base weights when targeted

__all__ = ["LoraConfig", "LoraLinear", "LoraEmbedding", "ModulesToSave", "apply", "add_adapter", "set_adapter",
           "delete_adapter", "disable_adapters", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload",
           "lora_plus_param_groups", "adapter_state_dict", "load_adapter_state_dict", "check_adapter_fits",
           "adapter_export", "config_from_peft_dict"]


# --- finding targets ----------------------------------------------------------------------------
def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, LoraLinear)) or (
        hasattr(m, "in_features") and hasattr(m, "out_features") and callable(getattr(m, "dequantize", None)))


def _is_embedding(m: nn.Module) -> bool:
    return isinstance(m, (nn.Embedding, LoraEmbedding))


def _candidates(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules LoRA may wrap, by name; the insides of LoRA layers and modules_to_save are skipped."""
    skip: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(m, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, m


def _name_matches(name: str, spec: Union[str, Sequence[str], None]) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _layer_index(name: str, pattern: Union[str, Sequence[str], None]) -> Optional[int]:
    pats = [pattern] if isinstance(pattern, str) else list(pattern or [])
    if not pats:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        m = next((mm for p in pats if (mm := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(m.group(1)) if m else None


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    head = getattr(model, "lm_head", None)
    return head.base_layer if isinstance(head, LoraLayer) else head


def resolve_targets(model: nn.Module, config: LoraConfig) -> List[str]:
    """Names of the modules `config` targets; ConfigError when none match or one is not a linear/embedding."""
    tm = DEFAULT_TARGETS if config.target_modules is None else config.target_modules
    cands = list(_candidates(model))
    head = _output_head(model)
    found = []
    for name, m in cands:
        if not name or _name_matches(name, config.exclude_modules) or _name_matches(name, config.modules_to_save):
            continue
        if tm == ALL_LINEAR:
            base = m.base_layer if isinstance(m, LoraLayer) else m
            hit = _is_linear(m) and base is not head
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = _name_matches(name, tm)
            if hit and config.layers_to_transform is not None:
                idx = _layer_index(name, config.layers_pattern)
                wanted = config.layers_to_transform
                hit = idx is not None and (idx == wanted if isinstance(wanted, int) else idx in wanted)
        if hit:
            if not (_is_linear(m) or _is_embedding(m)):
                raise ConfigError(f"LoraConfig: target module '{name}' is a {type(m).__name__}; LoRA wraps "
                                  "linear and embedding layers only")
            found.append(name)
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in cands if n and (_is_linear(m) or _is_embedding(m))})
        raise ConfigError(f"LoraConfig: target_modules {tm!r} match no module of {type(model).__name__}; "
                          f"available: {', '.join(leaves)} (match by name, by '.name' suffix, or regex)")
    return found


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> List[str]:
    out = []
    for spec in config.modules_to_save or []:
        hits = [n for n, m in _candidates(model) if n and (n == spec or n.endswith("." + spec))]
        if not hits:
            top = sorted({n for n, _ in model.named_children()} | {n for n, _ in _candidates(model) if n.count(".") <= 1})
            raise ConfigError(f"LoraConfig: modules_to_save entry '{spec}' matches no module; e.g. {', '.join(top)}")
        out += [h for h in hits if h not in out]
    return out


def _resolved(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config as stored on the model: defaults and 'all-linear' spelled out as PEFT saves them."""
    tm = config.target_modules
    if tm is None:
        tm = list(DEFAULT_TARGETS)
    elif tm == ALL_LINEAR:
        tm = sorted(resolve_targets(model, config))
    return dataclasses.replace(config, target_modules=tm)


# --- injection ----------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, LoraLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def _mts_layers(model: nn.Module) -> Iterator[Tuple[str, ModulesToSave]]:
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield name, m


def _lora_configs(model: nn.Module) -> Dict[str, LoraConfig]:
    configs = getattr(model, "peft_config", None) or {}
    other = [n for n, c in configs.items() if getattr(c, "peft_type", None) != "LORA"]
    if other:
        raise ConfigError(f"the model carries non-LoRA adapter(s) {other}; LoRA cannot be mixed with them")
    return configs


def apply(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Inject adapter `adapter_name`. On a model without LoRA it becomes the active (trainable) one;
    on a model that has LoRA adapters it is added beside them, inactive and frozen (as PEFT's
    `add_adapter`)."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"expected a LoraConfig, got {type(config).__name__}")
    config.validate()
    existing = _lora_configs(model)
    if adapter_name in existing:
        raise ConfigError(f"the model already has an adapter named '{adapter_name}'")
    if any(getattr(m, "merged_adapters", None) for _, m in lora_layers(model)):
        raise AdapterError("cannot add an adapter while adapters are merged; unmerge first")
    config = _resolved(model, config)
    targets = resolve_targets(model, config)
    mts = resolve_modules_to_save(model, config)
    _check_bias(model, config, targets)
    for name in mts:
        if any(not p.is_floating_point() for p in model.get_submodule(name).parameters()):
            raise ConfigError(f"LoraConfig: modules_to_save '{name}' holds quantized weights, which cannot train")
    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        m = model.get_submodule(name)
        if not isinstance(m, LoraLayer):
            m = LoraEmbedding(m) if isinstance(m, nn.Embedding) else LoraLinear(m)
            _set_module(model, name, m)
        m.update_layer(adapter_name, config, where=f"LoraConfig: module '{name}'")
    for name in mts:
        m = model.get_submodule(name)
        if not isinstance(m, ModulesToSave):
            m = ModulesToSave(m)
            _set_module(model, name, m)
        m.add(adapter_name)
    if not hasattr(model, "peft_config") or model.peft_config is None:
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    set_adapter(model, model.active_adapter if existing else adapter_name)
    return model


def _check_bias(model: nn.Module, config: LoraConfig, targets: List[str]) -> None:
    if config.bias != "none" and not _biases(model, config.bias, targets):
        where = "the model has" if config.bias == "all" else "the targeted layers have"
        raise ConfigError(f"LoraConfig: bias='{config.bias}' but {where} no bias parameters")


def _base(m: nn.Module) -> nn.Module:
    return m.base_layer if isinstance(m, LoraLayer) else m


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig) -> nn.Module:
    """Add another adapter beside the existing ones (inactive until `set_adapter`)."""
    return apply(model, config, adapter_name)


def set_adapter(model: nn.Module, adapter_name: Union[str, Sequence[str]]) -> None:
    """Activate one adapter (or several, whose outputs add); only the active ones train.

    A layer whose merged adapters are not exactly the new active set is unmerged first (exact)."""
    configs = _lora_configs(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise AdapterError(f"no adapter named {unknown} (have {', '.join(configs)})")
    for _, layer in lora_layers(model):
        layer.set_active(names)
        for attr in layer._adapter_dicts:
            for a, sub in getattr(layer, attr).items():
                for p in (sub.parameters() if isinstance(sub, nn.Module) else [sub]):
                    p.requires_grad_(a in names)
    for _, m in _mts_layers(model):
        m.active_adapter = next((n for n in names if n in m.modules_to_save), None)
        for a, sub in m.modules_to_save.items():
            sub.requires_grad_(a == m.active_adapter)
    for p in _bias_params(model, list(configs)).values():
        p.requires_grad_(False)
    for p in _bias_params(model, names).values():
        p.requires_grad_(True)
    model.active_adapter = names[0] if len(names) == 1 else names


def _biases(model: nn.Module, mode: str, targets: Sequence[str], mts: Sequence[str] = ()) -> Dict[str, nn.Parameter]:
    """Bias parameters that `bias=mode` trains, under their HF PEFT names (targeted layers' biases
    read `<name>.base_layer.bias`, whether or not the layer is wrapped yet)."""
    out: Dict[str, nn.Parameter] = {}
    if mode == "none":
        return out
    for name, m in _candidates(model):
        if isinstance(m, ModulesToSave) or name in mts:
            continue
        wrapped = isinstance(m, LoraLayer) or name in targets
        if mode == "lora_only" and not wrapped:
            continue
        b = _base(m)._parameters.get("bias")
        if isinstance(b, nn.Parameter):
            out[f"{name}.base_layer.bias" if wrapped else f"{name}.bias"] = b
    return out


def _bias_params(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Parameter]:
    out: Dict[str, nn.Parameter] = {}
    for a in names:
        targets = [n for n, layer in lora_layers(model) if a in layer.r]
        out.update(_biases(model, model.peft_config[a].bias, targets))
    return out


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter; removing the last one restores the plain base model."""
    configs = _lora_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named '{adapter_name}' (have {', '.join(configs) or 'none'})")
    if len(configs) == 1:
        unload(model)
        return
    for _, layer in lora_layers(model):
        layer.delete_adapter(adapter_name)
    for _, m in _mts_layers(model):
        if adapter_name in m.modules_to_save:
            del m.modules_to_save[adapter_name]
    for name, layer in list(lora_layers(model)):
        if not layer.r:
            _set_module(model, name, layer.original_base_layer())
    for name, m in list(_mts_layers(model)):
        if not len(m.modules_to_save):
            _set_module(model, name, m.original_module)
    del configs[adapter_name]
    active = model.active_adapter if isinstance(model.active_adapter, list) else [model.active_adapter]
    active = [a for a in active if a != adapter_name] or [next(iter(configs))]
    set_adapter(model, active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block.

    A merged layer that runs inside the block is unmerged (exactly) and stays unmerged afterwards;
    its adapters then run unmerged, so outputs after the block are unchanged. Biases trained with
    bias="all"/"lora_only" are part of the base layers and stay as trained.
    """
    mods = [m for _, m in lora_layers(model)] + [m for _, m in _mts_layers(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


# --- merging ------------------------------------------------------------------------------------
def _check_untied(model: nn.Module) -> None:
    owners: Dict[int, List[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, layer in lora_layers(model):
        w = getattr(layer.base_layer, "weight", None)
        if w is not None and len(owners.get(id(w), [])) > 1:
            raise AdapterError(f"cannot merge into '{name}': its weight is tied to {owners[id(w)]}; merging "
                               "would change both (untie the weights first)")


def merge_adapter(model: nn.Module, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
    """W0 += each active adapter's term (see lora_layers.py). safe_merge refuses NaN/inf results."""
    if not any(True for _ in lora_layers(model)):
        raise AdapterError("merge_adapter: the model has no LoRA layers")
    _check_untied(model)
    for name, layer in lora_layers(model):
        names = None if adapter_names is None else [a for a in adapter_names if a in layer.r]
        layer.merge(names, safe_merge=safe_merge, where=name)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def _strip(model: nn.Module, merged: bool) -> nn.Module:
    for name, layer in list(lora_layers(model)):
        _set_module(model, name, layer.merged_base_layer() if merged else layer.original_base_layer())
    for name, m in list(_mts_layers(model)):
        _set_module(model, name, m.module if merged else m.original_module)
    for attr in ("peft_config", "active_adapter"):
        if hasattr(model, attr):
            delattr(model, attr)
    cfg = getattr(model, "config", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if getattr(cfg, "tie_word_embeddings", False) and emb is not None and head is not None \
            and head.weight is not emb.weight:
        cfg.tie_word_embeddings = False  # a trained lm_head copy now differs from the embeddings
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False,
                     adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
    """Merge the active adapters and return the plain model (modules_to_save copies replace originals)."""
    merge_adapter(model, safe_merge=safe_merge, adapter_names=adapter_names)
    return _strip(model, merged=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the original base model comes back."""
    return _strip(model, merged=False)


# --- LoRA+ --------------------------------------------------------------------------------------
def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                           lr_embedding: float = 1e-6) -> List[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024, arXiv 2402.12354).

    η_B = ratio · η_A. As PEFT's create_loraplus_optimizer: lora_B and every other 1-D trainable
    tensor (biases, DoRA magnitudes, norms) get lr·ratio (no weight decay for biases and norms);
    LoRA on embeddings, where A and B swap roles (A = 0 at init), gets the fixed `lr_embedding`;
    everything else (lora_A, modules_to_save copies) gets lr.
    """
    if ratio < 1:
        raise ConfigError(f"LoRA+: ratio must be >= 1, got {ratio}")
    norm_ids = {id(p) for m in model.modules() if type(m).__name__.endswith("Norm") for p in m.parameters(False)}
    groups: Dict[str, List[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    emb_ids = {id(p) for _, m in lora_layers(model) if isinstance(m, LoraEmbedding)
               for p in list(m.lora_embedding_A.values()) + list(m.lora_embedding_B.values())}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in emb_ids:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            no_decay = "bias" in name or id(p) in norm_ids
            groups["B_no_decay" if no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    spec = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
            "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1], "name": f"loraplus_{k}"}
            for k, ps in groups.items() if ps]


# --- the HF PEFT file format --------------------------------------------------------------------
def _embedding_targeted(config: LoraConfig) -> bool:
    tm = config.target_modules
    if isinstance(tm, (list, tuple)):
        return any(e in tm for e in EMBEDDING_NAMES)
    return False


def _entries(model: nn.Module, config: LoraConfig, adapter_name: str, targets: List[str], mts: List[str]):
    """HF key -> (shape, internal parameter name after injection, optional).

    Works on the base model before injection (shapes for checking) and after (to find the tensors).
    """
    out: Dict[str, Tuple[tuple, str, bool]] = {}
    a = adapter_name
    emb_io = set()
    if _embedding_targeted(config):
        head = _output_head(model)
        inner = getattr(model, "model", None)
        emb = getattr(inner, "embed_tokens", None)
        emb = emb.base_layer if isinstance(emb, LoraLayer) else emb
        emb_io = {id(head), id(emb)} - {id(None)}
    for t in targets:
        base = _base(model.get_submodule(t))
        if isinstance(base, nn.Embedding):
            V, D, r = base.num_embeddings, base.embedding_dim, config.r
            out[f"{t}.lora_embedding_A"] = ((r, V), f"{t}.lora_embedding_A.{a}", False)
            out[f"{t}.lora_embedding_B"] = ((D, r), f"{t}.lora_embedding_B.{a}", False)
        else:
            i, o, r = base.in_features, base.out_features, config.r
            out[f"{t}.lora_A.weight"] = ((r, i), f"{t}.lora_A.{a}.weight", False)
            out[f"{t}.lora_B.weight"] = ((o, r), f"{t}.lora_B.{a}.weight", False)
            if config.use_dora:
                out[f"{t}.lora_magnitude_vector"] = ((o,), f"{t}.lora_magnitude_vector.{a}", False)
        if id(base) in emb_io:
            out[f"{t}.base_layer.weight"] = (tuple(base.weight.shape), f"{t}.base_layer.weight", True)
    for key, b in _biases(model, config.bias, targets, mts).items():
        out[key] = (tuple(b.shape), key, False)
    for name in mts:
        m = model.get_submodule(name)
        orig = m.original_module if isinstance(m, ModulesToSave) else m
        for pname, p in orig.named_parameters():
            out[f"{name}.{pname}"] = (tuple(p.shape), f"{name}.modules_to_save.{a}.{pname}", False)
    return {PREFIX + k: v for k, v in out.items()}


def _live_entries(model: nn.Module, adapter_name: str):
    configs = _lora_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named '{adapter_name}' (have {', '.join(configs) or 'none'})")
    config = configs[adapter_name]
    targets = [n for n, layer in lora_layers(model) if adapter_name in layer.r]
    mts = [n for n, m in _mts_layers(model) if adapter_name in m.modules_to_save]
    params = dict(model.named_parameters(remove_duplicate=False))
    entries = _entries(model, config, adapter_name, targets, mts)
    return config, {k: (shape, params[path], opt) for k, (shape, path, opt) in entries.items()}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT keys (detached; merged adapters are saved unmerged)."""
    _, entries = _live_entries(model, adapter_name)
    return {k: p.detach() for k, (_, p, _) in entries.items()}


def adapter_export(model: nn.Module, adapter_name: str = "default") -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config.json dict) as `save_adapter` writes them; converts pissa_niter (see top)."""
    config, entries = _live_entries(model, adapter_name)
    tensors = {k: p.detach() for k, (_, p, _) in entries.items()}
    if config.pissa_niter is None:
        return tensors, config.to_peft_dict()
    for name, layer in lora_layers(model):
        if adapter_name in layer._pissa_init:
            A0, B0 = (t.to(layer.lora_A[adapter_name].weight.device) for t in layer._pissa_init[adapter_name])
            kA, kB = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
            tensors[kA] = torch.cat([tensors[kA], A0], 0)
            tensors[kB] = torch.cat([tensors[kB], -B0], 1)
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    converted = dataclasses.replace(config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True)
    return tensors, converted.to_peft_dict()


def check_adapter_fits(model: nn.Module, config: LoraConfig, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Before anything changes: the adapter's targets exist in `model` and every tensor's key and shape fit."""
    if config.pissa_niter is not None:
        raise AdapterError(f"{source}: init_lora_weights '{config.init_lora_weights}': this adapter's frozen base "
                           "is a residual from a randomized SVD drawn at training time, which cannot be rebuilt; "
                           "save it converted to plain LoRA (peftlab's save_adapter does)")
    try:
        _lora_configs(model)
        cfg = _resolved(model, config)
        targets = resolve_targets(model, cfg)
        mts = resolve_modules_to_save(model, cfg)
    except ConfigError as e:
        raise AdapterError(f"{source}: the adapter does not fit this base model: {e}") from None
    entries = _entries(model, cfg, "_", targets, mts)
    _compare(entries, sd, source)


def _compare(entries: dict, sd: Dict[str, torch.Tensor], source: str) -> None:
    unexpected = sorted(set(sd) - set(entries))
    if unexpected:
        raise AdapterError(f"{source}: tensor '{unexpected[0]}' does not belong to any targeted module of this "
                           f"base model ({len(unexpected)} such tensor(s))")
    missing = sorted(k for k, (_, _, opt) in entries.items() if not opt and k not in sd)
    if missing:
        raise AdapterError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    for k, t in sd.items():
        shape = tuple(entries[k][0])
        if tuple(t.shape) != shape:
            raise AdapterError(f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the base model needs {shape}")
        if not t.is_floating_point():
            raise AdapterError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type")


def load_adapter_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], adapter_name: str = "default",
                            source: str = "adapter") -> None:
    """Copy HF PEFT-keyed tensors into the injected adapter `adapter_name` (strict)."""
    _, entries = _live_entries(model, adapter_name)
    _compare(entries, sd, source)
    with torch.no_grad():
        for k, t in sd.items():
            entries[k][1].copy_(t.to(entries[k][1].dtype))
