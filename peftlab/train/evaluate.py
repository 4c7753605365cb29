"""Evaluation: token-level loss and perplexity, and exact-match accuracy by greedy generation.

    loss = -(1/N) Σ_t log p(y_t | y_<t)  over the N trained (answer) tokens,   ppl = exp(loss)
    accuracy = (1/M) Σ_i [normalise(greedy answer_i) == normalise(reference_i)]

The loss runs through `linear_ce.causal_lm_loss_sum` (output head and cross-entropy fused in row
chunks, so no [B, T, vocab] logits tensor where the model allows; `token_loss_sum` otherwise).
Generation runs in left-padded batches with the KV cache (models/generation.py) and stops at
the end-of-sequence token.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.collate import Collator, encode_example, encode_prompt, reference_answer
from ..data.match import exact_match
from ..models.generation import generate, left_pad
from .linear_ce import causal_lm_loss_sum


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    n = int((shift_labels != -100).sum())
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum"), n


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokenizer, examples: Sequence[Any], template: str = "default",
                  max_length: int = 256, batch_size: int = 32, device=None,
                  autocast_dtype: Optional[torch.dtype] = None, encoded: Optional[List[dict]] = None) -> Dict[str, float]:
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    enc = encoded if encoded is not None else [encode_example(tokenizer, ex, template=template, max_length=max_length)
                                               for ex in examples]
    collate = Collator(tokenizer.pad_id, padding_side="right")
    total, count = 0.0, 0
    for i in range(0, len(enc), batch_size):
        batch = collate(enc[i:i + batch_size])
        with _autocast(device, autocast_dtype):  # fused head + CE: no [B, T, vocab] logits where possible
            s, n = causal_lm_loss_sum(model, batch["input_ids"].to(device), batch["labels"].to(device))
        total += float(s)
        count += n
    model.train(was_training)
    if count == 0:  # nothing was scored (every answer truncated away): no loss, rather than 0
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, examples: Sequence[Any], template: str = "default",
                     max_new_tokens: int = 16, batch_size: int = 32, device=None,
                     autocast_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Greedy answers for the last assistant turn of each example."""
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, ex, template=template) for ex in examples]
    out: List[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i:i + batch_size], tokenizer.pad_id)
        with _autocast(device, autocast_dtype):
            new = generate(model, ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for row in new.tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            out.append(tokenizer.decode(row).strip())
    model.train(was_training)
    return out


def evaluate_accuracy(model, tokenizer, examples, template="default", max_new_tokens=16, batch_size=32,
                      device=None, autocast_dtype=None, num_samples: int = 3) -> Dict[str, Any]:
    preds = generate_answers(model, tokenizer, examples, template, max_new_tokens, batch_size, device, autocast_dtype)
    # data-to-text records carry several acceptable references
    refs = [ex.meta.get("references") or reference_answer(ex) for ex in examples]
    hits = [exact_match(p, r) for p, r in zip(preds, refs)]
    samples = [{"prompt": ex.messages[-2].content if len(ex.messages) >= 2 else "", "prediction": p, "reference": r if isinstance(r, str) else r[0]}
               for ex, p, r in list(zip(examples, preds, refs))[:num_samples]]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "samples": samples}
