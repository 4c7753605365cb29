"""A Llama-family decoder in one file (Llama 1/2/3, TinyLlama, Mistral, Qwen2).

    x_0 = E[tokens]                                         embed_tokens      [B, T, d]
    for each layer l:
        h   = x + W_o · Attn(RoPE(W_q n(x)), RoPE(W_k n(x)), W_v n(x))   input_layernorm, self_attn
        x   = h + W_down (silu(W_gate n(h)) ⊙ W_up n(h))                 post_attention_layernorm, mlp
    logits = W_head · n(x_L)                                 norm, lm_head     [B, T, vocab]

with n(x) = g ⊙ x / sqrt(mean(x²) + eps) (RMSNorm, Zhang & Sennrich 2019, arXiv 1910.07467),
rotary position embeddings (Su et al. 2021, arXiv 2104.09864), grouped-query attention (Ainslie
et al. 2023, arXiv 2305.13245: `num_key_value_heads` key/value heads shared by groups of query
heads) and the SwiGLU MLP (Shazeer 2020, arXiv 2002.05202). This is Touvron et al. 2023 (arXiv
2302.13971, §2.2), and parameter names follow Hugging Face's Llama so checkpoints load unchanged
(`model.layers.0.self_attn.q_proj.weight`, ...).

Optional pieces: attention biases (Qwen2 has them on q/k/v only), MLP biases, tied input/output
embeddings, "linear" and "llama3" RoPE scaling, Mistral's sliding-window attention, a KV cache
for generation (see generation.py), and gradient checkpointing per layer.

Shapes: B batch, T new tokens, S = P + T keys (P cached), H query heads, G key/value heads,
D head_dim, d hidden_size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .fused_ops import apply_rotary, rms_norm, swiglu


# The parameters each supported rope_scaling type needs ("default" is no scaling).
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class LlamaConfig:
    """Model hyperparameters under their Hugging Face names.

    `attention_bias` puts biases on q/k/v/o as HF Llama does; `attention_out_bias=False` with
    `attention_bias=True` is the Qwen2 layout (biases on q/k/v only). `head_dim` defaults to
    hidden_size / num_attention_heads. `rope_scaling` is None or a dict with `rope_type`
    ("linear" or "llama3") and its parameters.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    attention_bias: bool = False
    attention_out_bias: Optional[bool] = None
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        self.validate()

    def validate(self, source: str = "LlamaConfig") -> None:
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act '{self.hidden_act}' is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads ({self.num_attention_heads}) must be a "
                              f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in _ROPE_KEYS:
                raise ConfigError(f"{source}: rope_scaling type '{kind}' is not supported "
                                  "(supported: linear, llama3)")
            missing = [k for k in _ROPE_KEYS[kind] if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"{source}: rope_scaling of type '{kind}' lacks {', '.join(missing)}")
        if self.model_type not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"{source}: model_type '{self.model_type}' is not supported "
                              "(supported: llama, mistral, qwen2)")

    @property
    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once)."""
        d, D, H, G = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = d * H * D * 2 + d * G * D * 2
        if self.attention_bias:
            attn += H * D + 2 * G * D
        if self.attention_out_bias:
            attn += d
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d


class RMSNorm(nn.Module):
    """y = g ⊙ x / sqrt(mean(x²) + eps); a 16-bit x is normalised in float32 and cast back before
    the weight (as HF does), float32/float64 run as one autograd node (fused_ops.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """θ_i = rope_theta^(-2i/D), i < D/2, with optional scaling.

    "linear" (Chen et al. 2023, arXiv 2306.15595) divides every frequency by `factor`. "llama3"
    (Llama 3.1) leaves high frequencies (wavelength < L/high_freq_factor) alone, divides low ones
    (wavelength > L/low_freq_factor) by `factor`, and blends linearly in between, where L is
    `original_max_position_embeddings`.
    """
    D = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    rs = config.rope_scaling
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_len = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


def project(x: torch.Tensor, layers) -> List[torch.Tensor]:
    """[m(x) for m in layers] for linear layers that read the same x (q/k/v; gate/up).

    A layer class may compute such a group together through `forward_group(layers, x)`, which
    returns None where it does not apply; LoRA layers do (one autograd node whose backward handles
    all the adapters in shared GEMMs, see tuners/lora_layers.py). nn.Linear layers are called one by one.
    """
    group = getattr(layers[0], "forward_group", None)
    out = group(layers, x) if group is not None else None
    return out if out is not None else [m(x) for m in layers]


class KVCache:
    """Per-layer keys and values [B, G, S, D], grown in place as tokens arrive.

    Storage is over-allocated (doubling) so that decoding a token writes into existing memory
    instead of concatenating the whole cache. `length` counts positions already stored; the model
    advances it after every layer has appended. Prefix tuning pre-fills it with virtual keys and
    values. With autograd on, appending concatenates instead of writing in place (an in-place
    write would invalidate keys already saved for the backward pass).
    """

    def __init__(self, num_layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, T = self.length, k.shape[2]
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_k.shape[2] < start + T or torch.is_grad_enabled():
            # With autograd on (training through a prefix), plain concatenation keeps the graph simple.
            if buf_k is not None and torch.is_grad_enabled():
                nk, nv = torch.cat([buf_k[:, :, :start], k], 2), torch.cat([buf_v[:, :, :start], v], 2)
                self.k[layer], self.v[layer] = nk, nv
                return nk, nv
            cap = max(2 * (start + T), 64) if not torch.is_grad_enabled() else start + T
            nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                nk[:, :, :start] = buf_k[:, :, :start]
                nv[:, :, :start] = buf_v[:, :, :start]
            self.k[layer], self.v[layer] = buf_k, buf_v = nk, nv
        buf_k[:, :, start:start + T] = k
        buf_v[:, :, start:start + T] = v
        return buf_k[:, :, :start + T], buf_v[:, :, :start + T]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, through scaled_dot_product_attention."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)

    def forward(self, x, cos, sin, mask, kv_cache: Optional[KVCache]):
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:  # plain causal attention over exactly these T tokens
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: W_down (silu(W_gate x) ⊙ W_up x), the product through fused_ops.swiglu."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.gradient_checkpointing = False

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` / `.half()` would cast the rotary frequencies with the weights; a θ_i
        # rounded to 8 bits turns the angle pos·θ_i by up to pos·θ_i/256, a wrong rotation at long
        # range. The table stays float32 (as load_pretrained builds it), on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)
        return self


class LlamaForCausalLM(nn.Module):
    """Decoder plus output head. `model(input_ids)` returns logits [B, T, vocab].

    forward(input_ids | inputs_embeds, attention_mask=None, position_ids=None, kv_cache=None,
            num_logits_to_keep=0)

    - attention_mask [B, P + T] (1 = real token, 0 = padding) covers cached and new tokens.
    - position_ids default to (number of real tokens before each token), i.e. cumsum(mask) - 1,
      so left-padded rows and prefix-cached rows get the same positions in training and decoding;
      without a mask they are P .. P + T - 1.
    - num_logits_to_keep > 0 computes the head for the last positions only (decoding).
    - return_hidden=True returns the final-norm hidden states [B, T, d] instead of logits.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- construction -------------------------------------------------------------------------
    def reset_parameters(self, seed: Optional[int] = None) -> "LlamaForCausalLM":
        """Initialise as for pretraining: N(0, initializer_range) weights, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.model.inv_freq = rope_inverse_frequencies(self.config).to(self.model.embed_tokens.weight.device)
        return self

    def gradient_checkpointing_enable(self, on: bool = True) -> None:
        self.model.gradient_checkpointing = on

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    # --- forward ------------------------------------------------------------------------------
    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv = self.model.inv_freq
        freqs = position_ids[:, :, None].float() * inv[None, None, :].float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                      # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _attention_mask(self, attention_mask, B, T, P, device):
        """Boolean [B, 1, T, P+T] mask (True = attend), or None for plain causal attention."""
        window = self.config.sliding_window
        needs_window = window is not None and P + T > window
        if attention_mask is None and P == 0 and not needs_window:
            return None
        if attention_mask is None and T == 1 and not needs_window:
            return None  # one new token attends to everything cached
        q_pos = torch.arange(P, P + T, device=device)[:, None]
        k_pos = torch.arange(P + T, device=device)[None, :]
        allowed = k_pos <= q_pos
        if needs_window:
            allowed = allowed & (k_pos > q_pos - window)
        mask = allowed[None, None].expand(B, 1, T, P + T)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
            # A fully padded query row would give NaN in softmax; let it see itself (output unused).
            mask = mask | (k_pos == q_pos)[None, None]
        return mask

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, num_logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        P = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != P + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                             f"{P + T} ({P} cached + {T} new)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
            else:
                position_ids = torch.arange(P, P + T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = self._attention_mask(attention_mask, B, T, P, x.device)
        for layer in self.model.layers:
            if self.model.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length = P + T
        x = self.model.norm(x)
        if return_hidden:
            return x
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        return self.lm_head(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Greedy or sampled decoding with a KV cache; see `peftlab.models.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)
