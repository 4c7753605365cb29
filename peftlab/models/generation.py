"""Autoregressive decoding with a KV cache: greedy and sampling, batched with left padding.

    prefill:  logits_T = f(x_1..x_T)            keys/values of all T prompt tokens cached
    step t:   y_t ~ p(· | logits_{t-1} / τ)      top-k / top-p (nucleus, Holtzman et al. 2019,
              logits_t = f(y_t | cache)          arXiv 1904.09751) filtering, or argmax

Rows of a batch are left-padded so that every prompt ends at the same column; the attention mask
hides the padding and positions count real tokens only, so a padded row decodes exactly as it
would alone. Any module with `forward(input_ids, attention_mask, kv_cache, num_logits_to_keep)`
and `new_kv_cache()` can be decoded: the base model, and the prompt/prefix-tuning wrappers that
put virtual tokens ahead of the prompt.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..errors import ConfigError


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass strictly before it already reaches top_p (keeps at least one)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Decode up to `max_new_tokens` tokens after `input_ids` [B, T] (left-padded if ragged).

    Returns the new tokens [B, n] (n <= max_new_tokens); after a row emits `eos_token_id` its
    remaining positions hold `pad_token_id` (or eos when no pad is given). Decoding n tokens runs
    the model n times (the prefill, then n - 1 cached steps); n = 0 runs it not at all.
    """
    B = input_ids.shape[0]
    device = input_ids.device
    if max_new_tokens < 0:
        raise ConfigError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids.new_empty(B, 0)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let the model take its plain causal path
    cache = model.new_kv_cache()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, kv_cache=cache, num_logits_to_keep=1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        step_logits = logits[:, -1].float()
        if do_sample:
            step_logits = _filter_logits(step_logits / max(temperature, 1e-6), top_k, top_p)
            nxt = torch.multinomial(step_logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            nxt = step_logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break  # the last token needs no logits after it
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, kv_cache=cache, num_logits_to_keep=1)
    return torch.stack(out, dim=1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask) LongTensors [B, T], right-aligned so every
    prompt ends in the last column (the layout `generate` decodes from)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, T - len(p):] = 1
    return ids, mask
