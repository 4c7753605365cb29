"""Hugging Face checkpoint directories in and out.

A checkpoint directory holds `config.json` (model_type llama, mistral or qwen2), the weights as
`model.safetensors` or as shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json`, and optionally `tokenizer.model` (sentencepiece).

Loading builds the model on the meta device (no memory), then reads one tensor at a time from
each shard, converts it to the requested dtype and device, and puts it in place, so the full
model is never held twice. With `quantize="nf4" | "fp4"`, each decoder linear weight is
quantized as soon as it is read; embeddings, norms and the output head stay in the compute
dtype. Checkpoints already quantized by bitsandbytes (keys `weight.absmax`, `weight.quant_map`,
`weight.quant_state.bitsandbytes__nf4`, ...) load as 4-bit directly.

Every problem (unknown model_type or config field, a missing, extra or misshapen tensor, a
truncated shard) is a `CheckpointError`/`ConfigError` naming the file and the tensor or field.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, read_json, safetensors_header, write_json
from .llama import LlamaConfig, LlamaForCausalLM, rope_inverse_frequencies

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Keys that describe how a checkpoint was made or run, not what it computes.
_HARMLESS_KEYS = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "_name_or_path",
    "auto_map", "output_attentions", "output_hidden_states", "return_dict", "pretraining_tp",
    "quantization_config", "max_window_layers", "use_sliding_window", "layer_types",
    "rope_parameters", "attention_dropout", "_attn_implementation_autoset", "tokenizer_class",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)} - {"attention_out_bias"}
# Tensors some older checkpoints carry that are derived, not learned.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


# --- config -----------------------------------------------------------------------------------
def config_from_dict(d: Dict[str, Any], source: str = CONFIG_NAME) -> LlamaConfig:
    """Translate a Hugging Face config dict (transformers v4 or v5 style) into `LlamaConfig`."""
    model_type = d.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(_ARCHITECTURES)})")
    unknown = sorted(k for k in d if k not in _CONFIG_FIELDS and k not in _HARMLESS_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unsupported config field(s) {', '.join(unknown)}; "
                          f"supported: {', '.join(sorted(_CONFIG_FIELDS | _HARMLESS_KEYS))}")
    if d.get("attention_dropout", 0.0):
        raise ConfigError(f"{source}: field 'attention_dropout' = {d['attention_dropout']} is not supported (only 0)")
    if d.get("use_sliding_window", False):
        raise ConfigError(f"{source}: field 'use_sliding_window' = true (Qwen2 per-layer sliding "
                          "windows) is not supported")
    types = set(d.get("layer_types") or ["full_attention"])
    if types - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{source}: field 'layer_types' has unsupported entries {sorted(types)}")
    if len(types) > 1:  # one window (or none) applies to every layer here
        raise ConfigError(f"{source}: field 'layer_types' mixes full and sliding-window attention "
                          "layers, which is not supported")
    kw = {k: v for k, v in d.items() if k in _CONFIG_FIELDS}
    rp = d.get("rope_parameters")
    if rp:
        kw.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default":
            kw.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
    rs = kw.get("rope_scaling")
    if rs is not None and rs.get("rope_type", rs.get("type")) == "default":
        kw["rope_scaling"] = None
    if model_type == "qwen2":
        kw["attention_bias"], kw["attention_out_bias"] = True, False
        if not d.get("use_sliding_window", False):
            kw["sliding_window"] = None
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(kw.get(key), list):  # Llama 3 lists several eos ids; keep the first
            kw[key] = kw[key][0] if kw[key] else None
    try:
        cfg = LlamaConfig(**kw)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).split(': ', 1)[-1]}") from None
    return cfg


def config_to_dict(cfg: LlamaConfig) -> Dict[str, Any]:
    """The Hugging Face config.json for `cfg` (transformers v4 field names, which v5 also reads)."""
    if cfg.model_type != "qwen2" and cfg.attention_bias != cfg.attention_out_bias:
        raise ConfigError("attention_out_bias differs from attention_bias: only model_type 'qwen2' "
                          "has biases on q/k/v but not o")
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "attention_out_bias"}
    if cfg.model_type == "qwen2":
        d.pop("attention_bias")
        d["use_sliding_window"] = False
    d["architectures"] = [_ARCHITECTURES[cfg.model_type]]
    d["torch_dtype"] = "float32"
    return d


def load_config(path: os.PathLike | str) -> LlamaConfig:
    path = Path(path)
    return config_from_dict(read_json(path / CONFIG_NAME, "config.json"), str(path / CONFIG_NAME))


# --- weights ----------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> List[Path]:
    """The safetensors files of a checkpoint directory, validated against the index if sharded."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if index.is_file():
        idx = read_json(index, "shard index")
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index}: lists shard '{f}', which is not in {path}")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def _iter_tensors(files: Iterable[Path]):
    """Yield (file, name, tensor) one tensor at a time."""
    from safetensors import safe_open

    for f in files:
        safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    yield f, name, st.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(value, requires_grad=value.is_floating_point()))


def _parse_dtype(dtype, header_dtype: torch.dtype) -> torch.dtype:
    if dtype == "auto" or dtype is None:
        return header_dtype
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise ConfigError(f"dtype '{dtype}' is not supported (float32, float16, bfloat16, auto)") from None
    return dtype


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_quantizable_linear(name: str) -> bool:
    """Decoder linear weights (q/k/v/o, gate/up/down) are quantized; embeddings and head are not."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


def load_pretrained(path: os.PathLike | str, dtype: Any = torch.float32, device: Any = "cpu",
                    quantize: Optional[str] = None, double_quant: bool = True, blocksize: int = 64,
                    load_tokenizer: bool = True) -> Tuple[LlamaForCausalLM, Any]:
    """Load a Hugging Face format checkpoint directory; returns `(model, tokenizer or None)`.

    dtype: torch dtype, a name ("bfloat16"), or "auto" (keep the stored dtype). quantize: None,
    "nf4" or "fp4" (4-bit decoder linears, Dettmers et al. 2023; compute in `dtype`).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if quantize not in (None, "nf4", "fp4"):
        raise ConfigError(f"quantize must be None, 'nf4' or 'fp4', got {quantize!r}")
    raw_cfg = read_json(path / CONFIG_NAME, "config.json")
    cfg = config_from_dict(raw_cfg, str(path / CONFIG_NAME))
    files = checkpoint_files(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    prequantized = isinstance(raw_cfg.get("quantization_config"), dict)
    stored_qtype = raw_cfg["quantization_config"].get("bnb_4bit_quant_type") if prequantized else None
    if prequantized and quantize and stored_qtype and quantize != stored_qtype:
        raise ConfigError(f"{path / CONFIG_NAME}: the checkpoint is already quantized as {stored_qtype}; "
                          f"quantize={quantize!r} cannot change that (pass quantize=None or {stored_qtype!r})")
    quant_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    seen = set()
    target_dtype = None
    for f, name, t in _iter_tensors(files):
        if name.endswith(_DERIVED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if prequantized and (name.endswith(_QUANT_SUFFIXES) or
                             (is_quantizable_linear(name) and t.dtype == torch.uint8)):
            base = name if name.endswith(".weight") else name[: name.index(".weight.") + len(".weight")]
            quant_parts.setdefault(base, {})[name] = t
            seen.add(base)
            continue
        if name not in expected:
            raise CheckpointError(f"{f}: unexpected tensor '{name}' (not part of a {cfg.model_type} "
                                  f"model with this config)")
        if tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(f"{f}: tensor '{name}' has shape {tuple(t.shape)}, the config "
                                  f"implies {tuple(expected[name])}")
        if not t.is_floating_point():
            raise CheckpointError(f"{f}: tensor '{name}' has dtype {t.dtype}, expected a float type")
        target_dtype = target_dtype or _parse_dtype(dtype, t.dtype)
        if name in seen:
            raise CheckpointError(f"{f}: tensor '{name}' appears in more than one shard")
        seen.add(name)
        t = t.to(device=device, dtype=target_dtype)
        if quantize and is_quantizable_linear(name):
            _install_4bit(model, name, t, quantize, blocksize, double_quant, target_dtype)
        else:
            _set_tensor(model, name, t)
        del t
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:8])}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    target_dtype = target_dtype or _parse_dtype(dtype, torch.float32)
    if quant_parts:
        _install_prequantized(model, quant_parts, device, target_dtype, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.inv_freq = rope_inverse_frequencies(cfg).to(device)
    tok = None
    if load_tokenizer and (path / TOKENIZER_NAME).is_file():
        from ..tokenizer import Tokenizer

        tok = Tokenizer.load(path / TOKENIZER_NAME)
    model.name_or_path = str(path)
    return model, tok


def _install_4bit(model, name, weight, quant_type, blocksize, double_quant, compute_dtype):
    from ..quant.linear4bit import Linear4bit

    mod_name = name[: -len(".weight")]
    parent_name, _, child = mod_name.rpartition(".")
    old = model.get_submodule(mod_name)
    new = Linear4bit.from_weight(weight, bias=None, quant_type=quant_type, blocksize=blocksize,
                                 double_quant=double_quant, compute_dtype=compute_dtype)
    if old.bias is not None:
        new.bias = old.bias  # still on meta; the bias tensor may come later in the shard order
    setattr(model.get_submodule(parent_name), child, new)


def _install_prequantized(model, parts, device, compute_dtype, path):
    from ..quant.linear4bit import Linear4bit

    for base in list(parts):
        tensors = parts.pop(base)  # drop the host copy as each layer is installed
        mod_name = base[: -len(".weight")]
        parent_name, _, child = mod_name.rpartition(".")
        try:
            old = model.get_submodule(mod_name)
        except AttributeError:
            raise CheckpointError(f"{path}: unexpected quantized tensor '{base}'") from None
        prefix = mod_name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items()}
        new = Linear4bit.from_bnb_state_dict(sd, in_features=old.in_features, out_features=old.out_features,
                                             compute_dtype=compute_dtype, device=device, source=f"{path}: {base}")
        if old.bias is not None:
            new.bias = old.bias
        setattr(model.get_submodule(parent_name), child, new)


# --- saving -----------------------------------------------------------------------------------
def _parse_size(size) -> int:
    """Bytes in `size`: an int, or a string like "2GB", "500MB", "1GiB" (as transformers takes)."""
    if isinstance(size, int) and size > 0:
        return size
    s = str(size).strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    mult = next((m for u, m in units if s.endswith(u)), 1)
    digits = next((s[: -len(u)] for u, _ in units if s.endswith(u)), s)
    try:
        n = int(float(digits) * mult)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"max_shard_size {size!r} is not a positive size such as 2GB, 500MB or 1GiB")
    return n


def _quantization_config(model) -> Optional[Dict[str, Any]]:
    """bitsandbytes' `quantization_config` for a model holding Linear4bit layers (else None)."""
    from ..quant.linear4bit import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    kinds = {(m.quant_state.quant_type, m.quant_state.nested, m.quant_state.blocksize) for m in layers}
    if len(kinds) > 1:
        raise ConfigError(f"save_pretrained: 4-bit layers mix settings {sorted(kinds)}; bitsandbytes' "
                          "config can describe only one")
    qtype, nested, _ = kinds.pop()
    compute = layers[0].compute_dtype or torch.float32
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": qtype, "bnb_4bit_use_double_quant": nested,
            "bnb_4bit_compute_dtype": str(compute).replace("torch.", ""), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def save_pretrained(model: LlamaForCausalLM, out_dir: os.PathLike | str, tokenizer=None,
                    max_shard_size: Any = "2GB", dtype: Optional[torch.dtype] = None) -> Path:
    """Write `model` as a Hugging Face checkpoint (sharded above `max_shard_size`), atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point() and ".weight." not in name:  # not 4-bit state
            t = t.to(dtype)
        sd[name] = t.to("cpu").contiguous()
    cfg_dict = config_to_dict(cfg)
    qcfg = _quantization_config(model)
    if qcfg:
        cfg_dict["quantization_config"] = qcfg
    first = next((t for t in sd.values() if t.is_floating_point()), None)
    if first is not None:
        cfg_dict["torch_dtype"] = str(first.dtype).replace("torch.", "")
    limit = _parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    # Every new file is written (atomically) before any old one is removed, so a save that fails
    # midway leaves the previous checkpoint whole; the files it replaces go last.
    if len(shards) == 1:
        written = [out / WEIGHTS_NAME]
        with atomic_write(written[0]) as f:
            f.write(save(shards[0], metadata={"format": "pt"}))
    else:
        weight_map, written = {}, []
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            with atomic_write(out / fname) as f:
                f.write(save(shard, metadata={"format": "pt"}))
            written.append(out / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(out / INDEX_NAME)
    for stale in set(out.glob("model*.safetensors")) | {out / INDEX_NAME}:
        if stale not in written and stale.exists():
            stale.unlink()
    write_json(out / CONFIG_NAME, cfg_dict)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
