"""P-tuning's prompt encoder and templates (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385).

Prompt encoder (§3.2, "Optimization"). The N virtual-token vectors are not free parameters but
the output of a small network over trainable inputs E ∈ R^{N×d}, which couples the tokens and
eases optimisation:

    LSTM:  h_i = MLP([→LSTM(E_{0:i}) ; ←LSTM(E_{i:N})])      bidirectional, MLP = Linear-ReLU-Linear
    MLP:   h_i = MLP(E_i)                                     Linear-ReLU-Linear-ReLU-Linear

Shapes: E [N, d] -> LSTM [N, 2h] -> MLP [N, d] (LSTM), or E [N, d] -> [N, h] -> [N, h] -> [N, d].
Parameter names follow Hugging Face PEFT's PromptEncoder (`embedding`, `lstm_head`,
`mlp_head.0/2/4`), but only the output h is ever saved (`prompt_embeddings`), so after training
the encoder is folded away (`PromptModel.fold()`).

Templates (§3). The paper's prompts interleave continuous tokens with the input and with
discrete anchor tokens, e.g. for LAMA: "[P] [P] {subject} [P] is located in [P]" followed by the
answer. A template string here has three kinds of parts:

    [P]        the next virtual token (the k-th [P] is virtual token k; there must be exactly N)
    {field}    the example's field, tokenized
    other text anchor tokens, tokenized

Each part is stripped and encoded separately (`tokenizer.encode(text)`, no bos/eos; with a
SentencePiece tokenizer the dummy-prefix space separates the parts), so a template's token
boundaries never depend on the field values. `encode_template` gives `input_ids`, `prompt_slots`
(-1 on real tokens, k where virtual token k goes) and `labels` (-100 except the target);
`collate_templates` left-pads a batch; `PromptModel.forward(..., prompt_slots=...)` or
`template_embeddings` put the virtual tokens in place. The Hugging Face layout (all virtual
tokens as one prefix) is what `PromptModel.forward` does without slots.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError, DataError

ENCODER_TYPES = ("MLP", "LSTM")
_PARTS = re.compile(r"\[P\]|\{(\w+)\}")


class PromptEncoder(nn.Module):
    """h = MLP(BiLSTM(E)) or MLP(E) (module docstring); forward() -> [N, d]."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden_size: int, kind: str = "MLP",
                 num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if kind not in ENCODER_TYPES:
            raise ConfigError(f"PromptEncoder: kind must be one of {', '.join(ENCODER_TYPES)}, got {kind!r}")
        self.kind = kind
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden_size, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, token_dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        if self.kind == "LSTM":
            e = self.lstm_head(e[None])[0][0]
        return self.mlp_head(e)


# --- templates ------------------------------------------------------------------------------
def parse_template(template: str) -> List[Tuple[str, str]]:
    """[(kind, value)] with kind "P" (virtual token), "field" (name) or "text" (anchor text)."""
    parts, pos = [], 0
    for m in _PARTS.finditer(template):
        text = template[pos:m.start()].strip()
        if text:
            parts.append(("text", text))
        parts.append(("field", m.group(1)) if m.group(1) else ("P", ""))
        pos = m.end()
    if template[pos:].strip():
        parts.append(("text", template[pos:].strip()))
    return parts


def encode_template(template: str, tokenizer: Any, fields: Mapping[str, Any], num_virtual_tokens: int,
                    target: Optional[str] = None, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                    record: str = "example") -> Dict[str, List[int]]:
    """One example as {"input_ids", "prompt_slots", "labels"} (lists of equal length).

    `tokenizer.encode(text) -> list[int]` must not add bos/eos (peftlab.Tokenizer's default).
    `bos_id` is prepended if given; `target` (and `eos_id`) is appended and is the only labelled
    part. Virtual-token positions hold input id 0 (never looked up: they are replaced).
    """
    parts = parse_template(template)
    n_p = sum(kind == "P" for kind, _ in parts)
    if n_p != num_virtual_tokens:
        raise ConfigError(f"template {template!r} has {n_p} [P] slots, the adapter has {num_virtual_tokens} "
                          "virtual tokens")
    ids: List[int] = [] if bos_id is None else [bos_id]
    slots: List[int] = [-1] * len(ids)
    k = 0
    for kind, value in parts:
        if kind == "P":
            ids.append(0)
            slots.append(k)
            k += 1
            continue
        if kind == "field":
            if value not in fields:
                raise DataError(f"{record}: field '{value}' (used by template {template!r}) is missing")
            value = str(fields[value]).strip()
        piece = list(tokenizer.encode(value)) if value else []
        ids += piece
        slots += [-1] * len(piece)
    labels = [-100] * len(ids)
    if target is not None:
        tail = list(tokenizer.encode(str(target).strip())) + ([] if eos_id is None else [eos_id])
        ids += tail
        slots += [-1] * len(tail)
        labels += tail
    return {"input_ids": ids, "prompt_slots": slots, "labels": labels}


def collate_templates(rows: Sequence[Dict[str, List[int]]], pad_id: int, padding_side: str = "left") -> Dict[str, torch.Tensor]:
    """Pad encoded templates to [B, T]: pads get attention 0, slot -1 and label -100."""
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not rows:
        raise DataError("collate_templates: empty batch")
    T = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), T), dtype=torch.long),
           "prompt_slots": torch.full((len(rows), T), -1, dtype=torch.long),
           "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        out["input_ids"][i, sl] = torch.tensor(r["input_ids"], dtype=torch.long)
        out["attention_mask"][i, sl] = 1
        out["prompt_slots"][i, sl] = torch.tensor(r["prompt_slots"], dtype=torch.long)
        out["labels"][i, sl] = torch.tensor(r.get("labels", [-100] * n), dtype=torch.long)
    return out


def place_virtual_tokens(inputs_embeds: torch.Tensor, prompt: torch.Tensor, prompt_slots: torch.Tensor) -> torch.Tensor:
    """inputs_embeds [B, T, d] with row (b, t) replaced by prompt[k] wherever prompt_slots[b, t] == k >= 0."""
    if prompt_slots.shape != inputs_embeds.shape[:2]:
        raise DataError(f"prompt_slots has shape {tuple(prompt_slots.shape)}, the input is "
                        f"{tuple(inputs_embeds.shape[:2])}")
    N = prompt.shape[0]
    if bool(((prompt_slots < -1) | (prompt_slots >= N)).any()):
        raise DataError(f"prompt_slots must lie in [-1, {N}) (-1 = real token, k = virtual token k)")
    chosen = prompt[prompt_slots.clamp(min=0)]
    return torch.where((prompt_slots >= 0)[..., None], chosen, inputs_embeds)


def template_embeddings(model, template: str, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                        pad_id: int = 0, bos_id: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings [B, T, d] and attention mask [B, T] (left-padded) of `examples` in `template`,
    with `model`'s (a PromptModel's) virtual tokens in their slots; differentiable in the prompt."""
    rows = [encode_template(template, tokenizer, ex, model.num_virtual_tokens, bos_id=bos_id, record=f"example {i}")
            for i, ex in enumerate(examples)]
    batch = collate_templates(rows, pad_id)
    emb = model.get_input_embeddings()
    device = emb.weight.device
    x = emb(batch["input_ids"].to(device))
    x = place_virtual_tokens(x, model.prompt().to(x.dtype), batch["prompt_slots"].to(device))
    return x, batch["attention_mask"].to(device)


class _SlotsOnFirstCall:
    """Lets `generation.generate` drive a template batch: slots go with the first call only."""

    def __init__(self, model, prompt_slots: torch.Tensor):
        self.model, self.prompt_slots = model, prompt_slots

    def new_kv_cache(self):
        return self.model.new_kv_cache()

    def __call__(self, **kw):
        first = kw["kv_cache"].num_virtual is None
        return self.model(**kw, prompt_slots=self.prompt_slots if first else None)


def generate_with_slots(model, input_ids: torch.Tensor, prompt_slots: torch.Tensor, **kwargs) -> torch.Tensor:
    from ..models.generation import generate

    return generate(_SlotsOnFirstCall(model, prompt_slots), input_ids, **kwargs)
