"""Prompt tuning and P-tuning: trainable virtual tokens in the input embedding sequence.

Prompt tuning (Lester et al. 2021, arXiv 2104.08691, §2). The frozen model reads N trainable
vectors P_e ahead of the embedded input X_e:

    Pr_θ,θP(Y | [P; X]),   inputs_embeds = [P_e ; X_e]           P_e ∈ R^{N×d},  [B, N + T, d]

θ (the model) is frozen and only P_e (N·d numbers) is learned. Initialisation (§2.1, §3.2
"Prompt Initialization"): RANDOM samples U(-0.5, 0.5) as the paper does (Hugging Face PEFT uses
nn.Embedding's N(0, 1) instead); TEXT copies the embeddings of a tokenized text, repeated or cut
to N tokens (encoded without bos; Hugging Face's AutoTokenizer adds bos for Llama tokenizers);
VOCAB samples the embeddings of N distinct tokens among the `vocab_top_k` most frequent ones.
The paper takes T5's 5,000 first SentencePiece ids, ordered by corpus likelihood; we have no
frequency table for arbitrary tokenizers, so the ids come from `vocab_ids` if given, else from
the tokenizer's first `vocab_top_k` ordinary pieces (control, unknown, unused and byte-fallback
pieces skipped): in a SentencePiece BPE vocabulary the low ids after the specials are the
earliest, hence most frequent, merges. Without a tokenizer the ids 0, bos, eos and pad are
skipped. SAMPLE_VOCAB (Hugging Face's name) samples uniformly from the whole vocabulary.

P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385, §3): the prompt is
reparameterised by a prompt encoder (ptuning.py), h = MLP(BiLSTM(E)) or h = MLP(E), and the
virtual tokens may sit anywhere in a template, between discrete anchor tokens and the input:

    T = {[P_0:i], e(x), [P_i+1:j], e("is located in"), [P_j+1:m], e(y)}

`encode_template`/`collate_templates` in ptuning.py build such batches; `forward(...,
prompt_slots=...)` then places the k-th virtual token where `prompt_slots == k`. Without
slots (the Hugging Face layout) all N virtual tokens form a prefix, exactly as prompt tuning.

The wrapper (`PromptModel`) keeps the base model frozen and untouched, and its contract is:

    logits = model(input_ids, attention_mask=None, position_ids=None, ...)   [B, T, vocab]

Logits (and `return_hidden` states) cover the real tokens only, so a trainer's labels and loss
need no change. `attention_mask` and `position_ids` describe the real tokens; the wrapper adds
N ones to the mask and positions 0..N-1 for the virtual tokens (real tokens then start at N).
With left padding the batch layout is [P_e ; pads ; X_e] and positions count unmasked tokens,
so every row computes what it would alone. Decoding: `new_kv_cache()` gives a cache that
remembers that the virtual tokens were added on the first call; later calls feed real tokens
only (`peftlab.models.generation.generate` works unchanged).

Files (Hugging Face PEFT format): `adapter_model.safetensors` holds `prompt_embeddings` [N, d],
the encoder's OUTPUT. Loading a file therefore gives a folded model (P-tuning's LSTM/MLP is not
stored anywhere), in Hugging Face's words an inference-mode one; `fold()` turns a trained
P-tuning model into that form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

import torch
import torch.nn as nn

from ..configs import check_keys, from_dict
from ..errors import AdapterError, ConfigError, DataError
from ..models.llama import KVCache
from .ptuning import ENCODER_TYPES, PromptEncoder, generate_with_slots, place_virtual_tokens

PROMPT_KEY = "prompt_embeddings"
TASK_TYPE = "CAUSAL_LM"
# adapter_config.json keys Hugging Face PEFT writes that describe the file, not the computation.
_BOOKKEEPING = ("peft_type", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
                "inference_mode", "modules_to_save", "tokenizer_kwargs")


# --- configs ----------------------------------------------------------------------------------
@dataclass
class PromptLearningConfig:
    """Fields shared by the virtual-token methods, under Hugging Face PEFT's names.

    `token_dim`, `num_layers` and `num_attention_heads` are filled in from the model by
    `get_peft_model` (for prefix tuning, as Hugging Face does for grouped-query attention, they
    describe the key/value heads: token_dim = num_key_value_heads · head_dim). When set in a
    loaded file they must agree with the model. `inference_mode=True` builds only the folded
    prompt (no encoder network); loading an adapter file always does.
    """

    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_transformer_submodules: int = 1
    task_type: str = TASK_TYPE
    inference_mode: bool = False

    peft_type: ClassVar[str] = ""
    _NOT_SAVED: ClassVar[tuple] = ()

    def __post_init__(self):
        where = type(self).__name__
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"{where}: num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_transformer_submodules != 1:
            raise ConfigError(f"{where}: num_transformer_submodules must be 1 (decoder-only models), "
                              f"got {self.num_transformer_submodules}")
        if self.task_type != TASK_TYPE:
            raise ConfigError(f"{where}: task_type must be '{TASK_TYPE}', got {self.task_type!r}")

    def model_dims(self, model_config) -> Dict[str, int]:
        """The shape fields this method derives from the base model's config."""
        return {"token_dim": model_config.hidden_size, "num_layers": model_config.num_hidden_layers,
                "num_attention_heads": model_config.num_attention_heads}

    def resolved(self, model_config, source: str):
        """A copy with the shape fields filled in from the model (checked where already set)."""
        dims = self.model_dims(model_config)
        for k, v in dims.items():
            have = getattr(self, k)
            if have is not None and have != v:
                raise AdapterError(f"{source}: field '{k}' is {have} but the base model needs {v} "
                                   f"(hidden_size={model_config.hidden_size}, layers={model_config.num_hidden_layers}, "
                                   f"heads={model_config.num_attention_heads}/{model_config.num_key_value_heads})")
        return dataclasses.replace(self, **dims)

    def folded_width(self) -> int:
        """Width of one row of the folded prompt a file stores (resolved configs only)."""
        return self.token_dim

    def to_peft_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._NOT_SAVED}
        d.update(peft_type=self.peft_type, inference_mode=True, modules_to_save=None)
        return d


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021). `prompt_tuning_init`: RANDOM | TEXT | VOCAB | SAMPLE_VOCAB.

    TEXT and VOCAB read a tokenizer: `tokenizer` (an object with `encode`, set by the trainer),
    else `tokenizer_name_or_path` (a `tokenizer.model` file or a folder holding one), else the
    base checkpoint's folder. VOCAB draws from `vocab_ids` when given.
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    vocab_ids: Optional[List[int]] = None
    vocab_top_k: int = 5000
    tokenizer: Optional[Any] = field(default=None, repr=False, compare=False)

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    _NOT_SAVED: ClassVar[tuple] = ("tokenizer",)
    INITS: ClassVar[tuple] = ("RANDOM", "TEXT", "VOCAB", "SAMPLE_VOCAB")

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_tuning_init not in self.INITS:
            raise ConfigError(f"PromptTuningConfig: prompt_tuning_init must be one of {', '.join(self.INITS)}, "
                              f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.vocab_top_k < 1:
            raise ConfigError(f"PromptTuningConfig: vocab_top_k must be positive, got {self.vocab_top_k}")

    def to_peft_dict(self) -> Dict[str, Any]:
        d = super().to_peft_dict()
        d["tokenizer_kwargs"] = None
        if self.prompt_tuning_init != "VOCAB":  # our own fields; only written when they mattered
            d.pop("vocab_ids")
            d.pop("vocab_top_k")
        return d


@dataclass
class PTuningConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): prompt encoder "MLP" (Linear-ReLU-Linear-ReLU-Linear) or "LSTM"
    (bidirectional, `encoder_num_layers` layers, then Linear-ReLU-Linear); `encoder_hidden_size`
    defaults to the model's hidden size. The MLP always has 2 hidden layers (as in Hugging Face)."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self):
        super().__post_init__()
        t = self.encoder_reparameterization_type
        if t not in ENCODER_TYPES:
            raise ConfigError(f"PTuningConfig: encoder_reparameterization_type must be one of "
                              f"{', '.join(ENCODER_TYPES)}, got {t!r}")
        if t == "MLP" and self.encoder_num_layers != 2 and not self.inference_mode:
            raise ConfigError("PTuningConfig: the MLP prompt encoder has exactly 2 hidden layers; "
                              f"encoder_num_layers={self.encoder_num_layers} is only meaningful for LSTM")
        if self.encoder_num_layers < 1 or not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"PTuningConfig: need encoder_num_layers >= 1 and 0 <= encoder_dropout < 1, got "
                              f"{self.encoder_num_layers}, {self.encoder_dropout}")

    def resolved(self, model_config, source: str):
        out = super().resolved(model_config, source)
        if out.encoder_hidden_size is None:
            out.encoder_hidden_size = out.token_dim
        return out


def peft_dict_to_config(cls, d: Dict[str, Any], source: str):
    """An adapter_config.json dict -> `cls`, strictly: unknown keys are errors, bookkeeping keys
    are checked (`modules_to_save` must be empty, `tokenizer_kwargs` unused) and dropped, and
    `inference_mode` is set: a file holds the folded prompt only."""
    if d.get("peft_type") != cls.peft_type:
        raise ConfigError(f"{source}: peft_type {d.get('peft_type')!r} is not {cls.peft_type}")
    if d.get("modules_to_save"):
        raise ConfigError(f"{source}: field 'modules_to_save' ({d['modules_to_save']}) is not supported "
                          "with virtual-token methods")
    fields = {k: v for k, v in d.items() if k not in _BOOKKEEPING}
    check_keys(cls, fields, source)
    if "tokenizer" in fields:
        raise ConfigError(f"{source}: field 'tokenizer' cannot come from a file")
    fields["inference_mode"] = True
    return from_dict(cls, fields, source)


def config_from_peft_dict(d: Dict[str, Any], source: str):
    cls = {"PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PTuningConfig}.get(d.get("peft_type"))
    if cls is None:
        raise ConfigError(f"{source}: peft_type {d.get('peft_type')!r} is not handled by prompt.py")
    return peft_dict_to_config(cls, d, source)


# --- the folded prompt and the wrapper shared with prefix tuning -------------------------------
class PromptTable(nn.Module):
    """A plain table of virtual-token vectors [N, width] (`embedding.weight`, Hugging Face's name).

    Prompt tuning's P_e (width d), and the folded form of P-tuning (width d) and prefix tuning
    (width num_layers · 2 · kv_dim)."""

    def __init__(self, num_virtual_tokens: int, width: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width, device=device)

    @classmethod
    def holding(cls, values: torch.Tensor) -> "PromptTable":
        table = cls(values.shape[0], values.shape[1], device=values.device)
        with torch.no_grad():
            table.embedding.weight.copy_(values)
        return table

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class VirtualTokenCache(KVCache):
    """A KV cache that remembers how many virtual positions the wrapper put ahead of the real
    tokens on the first call (N for a prefix, 0 for a template), so later calls extend the
    attention mask consistently. `None` until the first call."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.num_virtual: Optional[int] = None


class VirtualTokenModel(nn.Module):
    """Frozen base model + one virtual-token encoder (`prompt_encoder[adapter_name]`).

    Attributes follow Hugging Face's PeftModel: `base_model`, `prompt_encoder` (ModuleDict),
    `peft_config` ({name: config}), `active_adapter`. Subclasses implement `forward`.
    """

    def __init__(self, base_model: nn.Module, config: PromptLearningConfig, encoder: nn.Module, adapter_name: str):
        super().__init__()
        self.base_model = base_model
        self.prompt_encoder = nn.ModuleDict({adapter_name: encoder})
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.name_or_path = getattr(base_model, "name_or_path", None)
        for p in base_model.parameters():
            p.requires_grad_(False)

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def active_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapter]

    @property
    def num_virtual_tokens(self) -> int:
        return self.active_config.num_virtual_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def gradient_checkpointing_enable(self, on: bool = True) -> None:
        self.base_model.gradient_checkpointing_enable(on)

    def new_kv_cache(self) -> VirtualTokenCache:
        return VirtualTokenCache(self.base_model.config.num_hidden_layers)

    def prompt(self) -> torch.Tensor:
        """The virtual tokens [N, width] as the base model will see them (encoder output)."""
        return self.prompt_encoder[self.active_adapter]()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    # --- folding and files --------------------------------------------------------------------
    @torch.no_grad()
    def folded_prompt(self) -> torch.Tensor:
        """The encoder's output computed once, without dropout: what a file stores."""
        enc = self.prompt_encoder[self.active_adapter]
        was = enc.training
        enc.eval()
        try:
            return enc().detach().clone()
        finally:
            enc.train(was)

    def fold(self) -> "VirtualTokenModel":
        """Replace the encoder network by its output (a `PromptTable`); the outputs are unchanged.
        The table stays trainable (then it is trained directly, without reparameterisation)."""
        name = self.active_adapter
        if not isinstance(self.prompt_encoder[name], PromptTable):
            self.prompt_encoder[name] = PromptTable.holding(self.folded_prompt())
            self.peft_config[name] = dataclasses.replace(self.peft_config[name], inference_mode=True)
        return self

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.folded_prompt().to("cpu")}

    def load_folded(self, sd: Dict[str, torch.Tensor], source: str) -> None:
        self.fold()
        table = self.prompt_encoder[self.active_adapter].embedding.weight
        t = check_folded(sd, tuple(table.shape), self.active_config.peft_type, source)
        with torch.no_grad():
            table.copy_(t.to(table.device, table.dtype))

    # --- shared forward helpers ---------------------------------------------------------------
    def _first_call(self, kv_cache: Optional[KVCache], offset: int) -> tuple[bool, int]:
        """(is this the call that adds the virtual tokens, virtual positions ahead of the real ones)."""
        if kv_cache is None:
            return True, offset
        if not isinstance(kv_cache, VirtualTokenCache):
            raise AdapterError(f"{type(self).__name__}: pass a cache from model.new_kv_cache() (got "
                               f"{type(kv_cache).__name__}), so the virtual tokens are counted")
        if kv_cache.num_virtual is None:
            if kv_cache.length:
                raise AdapterError(f"{type(self).__name__}: the KV cache already holds {kv_cache.length} "
                                   "positions but no virtual tokens")
            kv_cache.num_virtual = offset
            return True, offset
        return False, kv_cache.num_virtual

    @staticmethod
    def _with_virtual_mask(attention_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        if attention_mask is None or n == 0:
            return attention_mask
        return torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], dim=1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Decode with the KV cache; see `peftlab.models.generation.generate`."""
        from ..models.generation import generate

        return generate(self, input_ids, **kwargs)


class PromptModel(VirtualTokenModel):
    """Prompt tuning / P-tuning wrapper; see the module docstring for the forward contract."""

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, num_logits_to_keep: int = 0, return_hidden: bool = False,
                prompt_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the T real tokens (or of the T template positions with slots).

        prompt_slots [B, T] (long): -1 at real tokens, k at the position of the k-th virtual token
        (a template, see ptuning.py); then nothing is prepended and masks/positions are used as
        given. Only on the call that starts a cache (or without a cache).
        """
        n = self.num_virtual_tokens
        first, offset = self._first_call(kv_cache, 0 if prompt_slots is not None else n)
        if prompt_slots is not None and not first:
            raise DataError("PromptModel: prompt_slots can only be given on the first call of a KV cache")
        kw = dict(kv_cache=kv_cache, num_logits_to_keep=num_logits_to_keep, return_hidden=return_hidden)
        attention_mask = self._with_virtual_mask(attention_mask, offset)
        if not first:
            if position_ids is not None:
                position_ids = position_ids + offset
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, **kw)
        if inputs_embeds is None:
            if input_ids is None:
                raise DataError("PromptModel: give input_ids or inputs_embeds")
            ids = input_ids if prompt_slots is None else input_ids.clamp(min=0)
            inputs_embeds = self.get_input_embeddings()(ids)
        prompt = self.prompt().to(inputs_embeds.dtype)
        if prompt_slots is not None:
            inputs_embeds = place_virtual_tokens(inputs_embeds, prompt, prompt_slots)
            return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kw)
        B = inputs_embeds.shape[0]
        inputs_embeds = torch.cat([prompt[None].expand(B, -1, -1), inputs_embeds], dim=1)
        if position_ids is not None:
            virtual = torch.arange(n, device=position_ids.device)[None].expand(B, n)
            position_ids = torch.cat([virtual, position_ids + n], dim=1)
        out = self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kw)
        T = inputs_embeds.shape[1] - n
        return out if num_logits_to_keep else out[:, n:n + T]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, prompt_slots: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Decode; with `prompt_slots` the input is a template batch (ptuning.collate_templates)."""
        if prompt_slots is None:
            return super().generate(input_ids, **kwargs)
        return generate_with_slots(self, input_ids, prompt_slots, **kwargs)


# --- initialisation ---------------------------------------------------------------------------
def _tokenizer_for(config: PromptTuningConfig, model: nn.Module):
    if config.tokenizer is not None:
        return config.tokenizer
    from ..tokenizer import TOKENIZER_FILE, Tokenizer

    path = config.tokenizer_name_or_path
    if path is None:
        base = getattr(model, "name_or_path", None)
        if base is None or not (Path(base) / TOKENIZER_FILE).is_file():
            return None
        path = base
    return Tokenizer.load(path)


def _frequent_ids(config: PromptTuningConfig, tokenizer, model_config) -> List[int]:
    """Candidate ids for VOCAB init (module docstring): `vocab_ids`, else the first ordinary pieces."""
    V = model_config.vocab_size
    if config.vocab_ids is not None:
        bad = [i for i in config.vocab_ids if not 0 <= i < V]
        if bad or not config.vocab_ids:
            raise ConfigError(f"PromptTuningConfig: vocab_ids must be non-empty ids in [0, {V}), got {bad or '[]'}")
        return list(config.vocab_ids)
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        def ordinary(i):
            return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
        ids = [i for i in range(min(V, sp.get_piece_size())) if ordinary(i)]
    else:
        special = {0, model_config.bos_token_id, model_config.eos_token_id, model_config.pad_token_id}
        ids = [i for i in range(V) if i not in special]
    return ids[: config.vocab_top_k]


def initial_prompt(config: PromptTuningConfig, model: nn.Module) -> torch.Tensor:
    """P_e at initialisation [N, d] (float32), on the embedding's device. Uses torch's global RNG."""
    emb = model.get_input_embeddings()
    N, d, device = config.num_virtual_tokens, emb.weight.shape[1], emb.weight.device
    kind = config.prompt_tuning_init
    if kind == "RANDOM":
        return torch.empty(N, d, device=device).uniform_(-0.5, 0.5)
    if kind == "SAMPLE_VOCAB":
        ids = torch.randint(0, emb.weight.shape[0], (N,))
    else:
        tok = _tokenizer_for(config, model)
        if kind == "TEXT":
            if tok is None:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs a tokenizer "
                                  "(tokenizer_name_or_path, or a base checkpoint folder with tokenizer.model)")
            text_ids = list(tok.encode(config.prompt_tuning_init_text))
            if not text_ids:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init_text encodes to no tokens")
            ids = torch.tensor((text_ids * (N // len(text_ids) + 1))[:N])
        else:  # VOCAB
            cands = torch.tensor(_frequent_ids(config, tok, model.config))
            pick = torch.randperm(len(cands))[:N] if len(cands) >= N else torch.randint(0, len(cands), (N,))
            ids = cands[pick]
    with torch.no_grad():
        return emb(ids.to(device)).detach().float().clone()


# --- hooks (see tuners/__init__.py) ---------------------------------------------------------
def check_folded(sd: Dict[str, torch.Tensor], shape: tuple, peft_type: str, source: str) -> torch.Tensor:
    """The file's only tensor, `prompt_embeddings`, checked against the [N, width] the config implies."""
    extra = sorted(set(sd) - {PROMPT_KEY})
    if extra:
        raise AdapterError(f"{source}: unexpected tensor(s) {', '.join(extra)}; a {peft_type} adapter holds "
                           f"only '{PROMPT_KEY}'")
    if PROMPT_KEY not in sd:
        raise AdapterError(f"{source}: tensor '{PROMPT_KEY}' not found")
    t = sd[PROMPT_KEY]
    if tuple(t.shape) != tuple(shape):
        raise AdapterError(f"{source}: tensor '{PROMPT_KEY}' has shape {tuple(t.shape)}, the config and model "
                           f"imply {tuple(shape)}")
    if not t.is_floating_point():
        raise AdapterError(f"{source}: tensor '{PROMPT_KEY}' has dtype {t.dtype}, expected a float type")
    return t


def check_adapter_fits(model: nn.Module, config, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Before the base model is wrapped (and frozen): the file's prompt fits this model and config."""
    check_base(model, config)
    cfg = config.resolved(model.config, source)
    check_folded(sd, (cfg.num_virtual_tokens, cfg.folded_width()), cfg.peft_type, source)


def check_base(model: nn.Module, config) -> None:
    if isinstance(model, VirtualTokenModel):
        raise AdapterError(f"{config.peft_type}: the model already carries a {model.active_config.peft_type} "
                           "adapter; apply virtual-token methods to a plain base model")
    if not hasattr(model, "get_input_embeddings") or not hasattr(getattr(model, "config", None), "num_hidden_layers"):
        raise AdapterError(f"{config.peft_type}: expected a peftlab LlamaForCausalLM, got {type(model).__name__}")


def apply(model: nn.Module, config, adapter_name: str = "default") -> PromptModel:
    check_base(model, config)
    config = config.resolved(model.config, type(config).__name__)
    device = model.get_input_embeddings().weight.device
    N, d = config.num_virtual_tokens, config.token_dim
    if config.inference_mode:
        encoder: nn.Module = PromptTable(N, d, device=device)
    elif config.peft_type == "PROMPT_TUNING":
        encoder = PromptTable.holding(initial_prompt(config, model))
    else:
        encoder = PromptEncoder(N, d, config.encoder_hidden_size, config.encoder_reparameterization_type,
                                config.encoder_num_layers, config.encoder_dropout).to(device)
    config = dataclasses.replace(config, tokenizer=None) if hasattr(config, "tokenizer") else config
    return PromptModel(model, config, encoder, adapter_name)


def _wrapper(model: nn.Module, adapter_name: str) -> VirtualTokenModel:
    if not isinstance(model, VirtualTokenModel) or adapter_name not in model.peft_config:
        raise AdapterError(f"no virtual-token adapter named '{adapter_name}' on this model")
    if adapter_name != model.active_adapter:
        raise AdapterError(f"adapter '{adapter_name}' is not the active one ('{model.active_adapter}')")
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """{"prompt_embeddings": encoder output} (Hugging Face PEFT's layout)."""
    return _wrapper(model, adapter_name).export_state_dict()


def load_adapter_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
    _wrapper(model, adapter_name).load_folded(sd, source)
