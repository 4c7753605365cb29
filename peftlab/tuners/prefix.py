"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) and deep prompt tuning (P-tuning v2).

Every attention layer l gets N trainable key/value vectors ahead of the real tokens' (§4.2):

    K^l = [P_K^l ; RoPE(W_k n(x))],   V^l = [P_V^l ; W_v n(x)]        P_K^l, P_V^l ∈ R^{G×N×D}
    Attn^l(x) = softmax(Q K^lᵀ / √D) V^l     (real tokens see all N prefix positions)

so activations at every layer are steered, not only the input. Reparameterisation (§4.3):
optimising P directly is unstable, so during training

    P = MLP(P'),  P' ∈ R^{N×kv}:  Embedding -> Linear(kv, h) -> Tanh -> Linear(h, L·2·kv)

with kv = G·D (key/value heads × head dim; Hugging Face PEFT's `token_dim` for grouped-query
models) and h = `encoder_hidden_size` (512 here; alias `projection_hidden_size`). After
training only P is needed: `fold()` computes it once and drops the MLP, leaving N·L·2·kv
numbers. With `prefix_projection=False` P itself is the parameter: deep prompt tuning,
P-tuning v2 (Liu et al. 2021, arXiv 2110.07602, §3), which prompts every layer without
reparameterisation.

Layout of P's row i (Hugging Face's, so files interchange): [L, 2, G, D] flattened, index
(l, 0) the key and (l, 1) the value of layer l. The prefix keys are stored as they enter
attention (no rotary embedding is applied to them; a rotation of a free vector is a
reparameterisation), real tokens sit at positions N, N+1, ... (the prefix occupies cache
positions 0..N-1), and the attention mask gets N leading ones; this is what Hugging Face PEFT
and transformers compute with a prefix cache. Keys and values enter through the KV cache:
with `kv_cache=None` (training) a read-only `StaticPrefix` stands in for the cache, so
gradient checkpointing can recompute a layer; with `model.new_kv_cache()` the first call
writes the prefix into the cache ahead of the prompt, and decoding continues from there.
With Mistral's sliding window the prefix is an ordinary cached position: a query more than
`sliding_window` positions past it no longer sees it (as with a transformers prefix cache).

Why a prefix and not an infix (Li & Liang §7): under causal attention the hidden state of token
t depends only on tokens s ≤ t. Virtual tokens placed after the input x (an infix,
[x ; INFIX ; y]) therefore receive exactly zero gradient from any loss on x's own hidden
states, ∂h_t/∂INFIX = 0 for t before the infix; they can influence y only. A prefix is attended
by every position, ∂h_t/∂PREFIX ≠ 0 for all t, so it conditions the whole sequence
(tests/test_prompt_math.py checks both, bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.llama import KVCache
from .prompt import (PromptLearningConfig, PromptTable, VirtualTokenModel, adapter_state_dict, check_base,  # noqa: F401
                     check_adapter_fits, load_adapter_state_dict, peft_dict_to_config)

DEFAULT_PROJECTION_HIDDEN = 512


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning; `prefix_projection=False` is deep prompt tuning (P-tuning v2).

    `init_weights="zero"` (Hugging Face's option) starts from an all-zero prefix (zero last MLP
    layer, or zero table), i.e. keys and values of zero."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: Optional[int] = None
    projection_hidden_size: Optional[int] = None
    init_weights: Optional[str] = None

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    _NOT_SAVED: ClassVar[tuple] = ("projection_hidden_size",)

    def __post_init__(self):
        super().__post_init__()
        a, b = self.encoder_hidden_size, self.projection_hidden_size
        if a is not None and b is not None and a != b:
            raise ConfigError(f"PrefixTuningConfig: encoder_hidden_size ({a}) and its alias "
                              f"projection_hidden_size ({b}) disagree")
        self.encoder_hidden_size = a if a is not None else (b if b is not None else DEFAULT_PROJECTION_HIDDEN)
        self.projection_hidden_size = None
        if self.encoder_hidden_size < 1:
            raise ConfigError(f"PrefixTuningConfig: encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig: init_weights must be null or 'zero', got {self.init_weights!r}")

    def model_dims(self, c) -> Dict[str, int]:
        return {"token_dim": c.num_key_value_heads * c.head_dim, "num_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_key_value_heads}

    def folded_width(self) -> int:
        return self.num_layers * 2 * self.token_dim


def config_from_peft_dict(d, source: str) -> PrefixTuningConfig:
    return peft_dict_to_config(PrefixTuningConfig, d, source)


class PrefixEncoder(nn.Module):
    """forward() -> P [N, L·2·kv]: MLP(P') with projection, else the table P itself."""

    def __init__(self, num_virtual_tokens: int, kv_dim: int, num_layers: int, hidden_size: int,
                 projection: bool = True, zero_init: bool = False):
        super().__init__()
        out = num_layers * 2 * kv_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, out))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        P = self.embedding.weight
        return self.transform(P) if self.projection else P


class StaticPrefix:
    """A read-only stand-in for `KVCache` in a cache-free (training) forward: layer l's keys and
    values are [prefix ; new]. Nothing is stored, so recomputing a layer (gradient
    checkpointing) gives the same result."""

    def __init__(self, keys: List[torch.Tensor], values: List[torch.Tensor]):
        self.keys, self.values = keys, values
        self.length = keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)


class PrefixModel(VirtualTokenModel):
    """Prefix-tuning wrapper: `forward` as the base model's, with every layer's prefix attended."""

    def prefix_kv(self, batch_size: int):
        """Per-layer keys and values [B, G, N, D] (lists of L) from the flat P [N, L·2·G·D]."""
        c = self.base_model.config
        N, L, G, D = self.num_virtual_tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        P = self.prompt().to(self.compute_dtype).view(N, L * 2, G, D).permute(1, 2, 0, 3)  # [2L, G, N, D]
        keys = [P[2 * l][None].expand(batch_size, G, N, D) for l in range(L)]
        values = [P[2 * l + 1][None].expand(batch_size, G, N, D) for l in range(L)]
        return keys, values

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, num_logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab]; masks and position_ids describe the real tokens (see module docstring)."""
        n = self.num_virtual_tokens
        first, offset = self._first_call(kv_cache, n)
        cache = kv_cache
        if first:
            B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            keys, values = self.prefix_kv(B)
            if kv_cache is None:
                cache = StaticPrefix(keys, values)
            else:
                for l, (k, v) in enumerate(zip(keys, values)):
                    kv_cache.append(l, k, v)
                kv_cache.length = n
        return self.base_model(input_ids=input_ids, attention_mask=self._with_virtual_mask(attention_mask, offset),
                               position_ids=None if position_ids is None else position_ids + offset,
                               inputs_embeds=inputs_embeds, kv_cache=cache, num_logits_to_keep=num_logits_to_keep,
                               return_hidden=return_hidden)


def apply(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> PrefixModel:
    check_base(model, config)
    config = config.resolved(model.config, "PrefixTuningConfig")
    device = model.get_input_embeddings().weight.device
    N, kv, L = config.num_virtual_tokens, config.token_dim, config.num_layers
    if config.inference_mode:
        encoder: nn.Module = PromptTable(N, L * 2 * kv, device=device)
    else:
        encoder = PrefixEncoder(N, kv, L, config.encoder_hidden_size, config.prefix_projection,
                                config.init_weights == "zero").to(device)
    return PrefixModel(model, config, encoder, adapter_name)
