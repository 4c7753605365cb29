"""`LoraConfig`: LoRA and its variants, under Hugging Face PEFT's field names.

    r, lora_alpha          ΔW = s · B A,  s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))
    lora_dropout           dropout on the adapter's input only
    target_modules         list: a module name matches an entry exactly or ends with "." + entry;
                           str: the full module name must match it as a regex (re.fullmatch);
                           "all-linear": every linear layer except the output head;
                           None: q_proj and v_proj (PEFT's default for Llama-family models)
    exclude_modules        same matching rules, removes modules from the targets
    layers_to_transform    int or list of decoder layer indices (with list targets only, as PEFT);
    layers_pattern         the name of the layer list ("layers"), default: first numbered segment
    modules_to_save        modules (e.g. lm_head, embed_tokens) trained as full copies; the original
                           stays frozen and comes back with `disable_adapters` or `unload`
    bias                   "none" | "all" (every bias trains) | "lora_only" (biases of targeted layers)
    use_dora               DoRA magnitude/direction split (Liu et al. 2024, arXiv 2402.09353)
    init_lora_weights      True (A Kaiming-uniform, B = 0) | "gaussian" (A ~ N(0, 1/r²), B = 0) |
                           "pissa" | "pissa_niter_N" (Meng et al. 2024, arXiv 2404.02948) |
                           False (A and B random: the adapter is not a no-op; for tests)

`config_from_peft_dict` reads an `adapter_config.json` written by any PEFT version. Fields that
describe how PEFT ran (inference_mode, revision, megatron_*, ...) are ignored; fields for features
peftlab does not implement must hold their default value, otherwise the adapter would load wrong
and that is a `ConfigError` naming the file and the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Union

from ..configs import from_dict
from ..errors import ConfigError

DEFAULT_TARGETS = ["q_proj", "v_proj"]
ALL_LINEAR = "all-linear"
_INIT_RE = re.compile(r"pissa_niter_(\d+)")

# adapter_config.json keys that change nothing about what the adapter computes.
_IGNORED_PEFT_KEYS = {
    "peft_type", "peft_version", "revision", "inference_mode", "auto_mapping", "megatron_config",
    "megatron_core", "runtime_config", "qalora_group_size",
    # settings consulted only by initialisations we refuse via init_lora_weights:
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}
# PEFT features peftlab does not implement: allowed only at these (inactive) values.
_INACTIVE_PEFT_VALUES: Dict[str, tuple] = {
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "use_qalora": (False, None),
    "lora_bias": (False, None), "layer_replication": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}), "use_bdlora": (None, False),
    "alora_invocation_tokens": (None, []), "arrow_config": (None,), "kasa_config": (None,),
    "monteclora_config": (None,), "velora_config": (None,), "ensure_weight_tying": (False, None),
}


@dataclass
class LoraConfig:
    """LoRA hyperparameters (Hu et al. 2021, arXiv 2106.09685); see the module docstring."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    task_type: Optional[str] = "CAUSAL_LM"
    base_model_name_or_path: Optional[str] = None

    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "LoraConfig") -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{source}: field 'r' must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"{source}: field 'lora_alpha' must be a positive number, got {self.lora_alpha!r}")
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ConfigError(f"{source}: field 'lora_dropout' must be a number in [0, 1), got {d!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"{source}: field 'bias' must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.fan_in_fan_out:
            raise ConfigError(f"{source}: field 'fan_in_fan_out' = true (Conv1D-style GPT-2 weights) is not "
                              "supported; Llama-family layers store weights as [out, in]")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"{source}: field 'task_type' = {self.task_type!r} is not supported (only 'CAUSAL_LM')")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa") or
                (isinstance(init, str) and _INIT_RE.fullmatch(init))):
            raise ConfigError(f"{source}: field 'init_lora_weights' = {init!r} is not supported (supported: "
                              "true, false, 'gaussian', 'pissa', 'pissa_niter_N')")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, str):
                if v != ALL_LINEAR or name == "exclude_modules":
                    try:
                        re.compile(v)
                    except re.error as e:
                        raise ConfigError(f"{source}: field '{name}' is not a valid regex: {e}") from None
            elif v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v)):
                raise ConfigError(f"{source}: field '{name}' must be a list of module names or a regex string")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ConfigError(f"{source}: field 'target_modules' is an empty list")
        lt = self.layers_to_transform
        if lt is not None and not (_is_index(lt) or (isinstance(lt, (list, tuple)) and all(map(_is_index, lt)))):
            raise ConfigError(f"{source}: field 'layers_to_transform' must be a layer index or a list of "
                              f"indices (integers >= 0), got {lt!r}")
        lp = self.layers_pattern
        if lp is not None and not (isinstance(lp, str) and lp or
                                   isinstance(lp, (list, tuple)) and all(isinstance(t, str) and t for t in lp)):
            raise ConfigError(f"{source}: field 'layers_pattern' must be a name or a list of names, got {lp!r}")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(f"{source}: field 'layers_to_transform' needs target_modules as a list "
                              "(with a regex, put the layer indices in the regex)")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError(f"{source}: field 'modules_to_save' must be a list of module names")

    # --- derived ------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)."""
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    @property
    def is_pissa(self) -> bool:
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa")

    @property
    def pissa_niter(self) -> Optional[int]:
        """N for "pissa_niter_N" (randomized SVD), None for exact "pissa" or another init."""
        m = _INIT_RE.fullmatch(self.init_lora_weights) if isinstance(self.init_lora_weights, str) else None
        return int(m.group(1)) if m else None

    def to_peft_dict(self) -> Dict[str, Any]:
        """The adapter_config.json body (HF PEFT field names; PEFT-only features at their defaults)."""
        d: Dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        if isinstance(self.lora_alpha, float) and self.lora_alpha.is_integer():
            d["lora_alpha"] = int(self.lora_alpha)
        d.update(peft_type=self.peft_type, inference_mode=True, rank_pattern={}, alpha_pattern={},
                 lora_bias=False, layer_replication=None, use_qalora=False)
        return d


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def config_from_peft_dict(d: Dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """Build a `LoraConfig` from an adapter_config.json dict, refusing features we lack (see module doc)."""
    if d.get("peft_type") != "LORA":
        raise ConfigError(f"{source}: field 'peft_type' is {d.get('peft_type')!r}, expected 'LORA'")
    ours = {f.name for f in fields(LoraConfig)}
    kept: Dict[str, Any] = {}
    for key, value in d.items():
        if key in ours:
            kept[key] = value
        elif key in _IGNORED_PEFT_KEYS:
            continue
        elif key in _INACTIVE_PEFT_VALUES:
            if not any(value == ok and type(value) is type(ok) for ok in _INACTIVE_PEFT_VALUES[key]):
                raise ConfigError(f"{source}: field '{key}' = {value!r} uses a PEFT feature peftlab does not "
                                  "implement; loading it would give wrong outputs")
        elif _is_off(value):
            continue  # a newer PEFT feature, switched off
        else:
            raise ConfigError(f"{source}: unknown field '{key}' = {value!r} (a newer PEFT feature?); peftlab "
                              "cannot tell whether it changes the adapter's output, so it refuses to load it")
    init = kept.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in ("true", "false"):
        kept["init_lora_weights"] = init.lower() == "true"
    try:
        return from_dict(LoraConfig, kept, source)
    except ConfigError as e:  # validation errors name the config class; name the file instead
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg.removeprefix('LoraConfig: ')}") from None
