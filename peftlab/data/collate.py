"""From `Example` to padded batches: labels, truncation, padding, packing.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (same length) and
the loss shifts by one itself, predicting token t+1 from positions <= t:

    loss = mean over {t : labels[t+1] != -100} of  -log p(labels[t+1] | input_ids[<= t])

`labels[t] = input_ids[t]` where the chat template's loss mask is True (assistant answers and their
eos, see `peftlab.tokenizer`), else -100. Plain text (pretraining) is `bos + text + eos`, all of it
trained.

Shapes out of `Collator`: input_ids, attention_mask, labels: LongTensor[B, T], T = the longest
sequence of the batch rounded up to `pad_to_multiple_of`; attention_mask is 1 on real tokens and
0 on padding, labels are -100 on padding.

Packing (`pack_examples`) is the simple kind: encoded examples are concatenated and cut into
chunks of `seq_len` tokens. Attention is NOT reset at example boundaries: a token may attend to
the end of the previous, unrelated example, and positions run on across the boundary. Each example
starts with bos, which marks the boundary for the model; that is the usual trade-off of
pretraining on packed text. An example longer than `seq_len` continues in the next chunk. The last
chunk may be shorter (the collator pads it); no token is dropped.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import DataError
from ..tokenizer import ASSISTANT_SIDE, Tokenizer, encode_chat
from .formats import Example

IGNORE_INDEX = -100


def encode_example(tokenizer: Tokenizer, example: Example, template: str = "default",
                   max_length: Optional[int] = None, truncation: str = "right") -> Dict[str, List[int]]:
    """`{"input_ids", "labels"}` of one example, truncated to `max_length` tokens.

    truncation="right" keeps the first `max_length` tokens, "left" keeps the last ones (which
    keeps the final answer of a long conversation).
    """
    if truncation not in ("left", "right"):
        raise DataError(f"truncation must be 'left' or 'right', got {truncation!r}")
    if example.text is not None:
        ids = tokenizer.encode(example.text, bos=True, eos=True)
        labels = list(ids)
    else:
        ids, mask = encode_chat(tokenizer, example.messages, system=example.system,
                                template=template, tools=example.tools)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if max_length is not None and len(ids) > max_length:
        if max_length < 1:
            raise DataError(f"max_length must be >= 1, got {max_length}")
        keep = slice(0, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        ids, labels = ids[keep], labels[keep]
    return {"input_ids": ids, "labels": labels}


def _last_assistant(example: Example) -> int:
    if example.text is not None or not example.messages:
        raise DataError("this example is plain text: it has no assistant turn to prompt for")
    if example.messages[-1].role not in ASSISTANT_SIDE:
        raise DataError(f"the last turn has role {example.messages[-1].role!r}, not an assistant turn")
    return len(example.messages) - 1


def encode_prompt(tokenizer: Tokenizer, example: Example, template: str = "default") -> List[int]:
    """Token ids up to and including the generation prompt of the last assistant turn."""
    last = _last_assistant(example)
    ids, _ = encode_chat(tokenizer, example.messages[:last], system=example.system,
                         template=template, add_generation_prompt=True, tools=example.tools)
    return ids


def reference_answer(example: Example) -> str:
    """The content of the last assistant turn (what generation is scored against)."""
    return example.messages[_last_assistant(example)].content


class Collator:
    """Pads a list of `{"input_ids", "labels"?}` into LongTensors (module docstring, "Shapes").

    Features without `labels` get labels equal to their input_ids (pretraining).
    """

    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: Optional[int] = None):
        if padding_side not in ("left", "right"):
            raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = int(pad_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if not features:
            raise DataError("Collator: empty batch")
        rows = []
        for i, f in enumerate(features):
            ids = [int(t) for t in f["input_ids"]]
            labels = [int(t) for t in f.get("labels", ids)]
            if len(labels) != len(ids):
                raise DataError(f"Collator: feature {i} has {len(ids)} input_ids but {len(labels)} labels")
            if not ids:
                raise DataError(f"Collator: feature {i} has no tokens")
            rows.append((ids, labels))
        T = max(len(ids) for ids, _ in rows)
        m = self.pad_to_multiple_of
        if m:
            T = -(-T // m) * m
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(T - n, T)
            input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(lab, dtype=torch.long)
            attention[b, sl] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_examples(encoded: Sequence[Dict[str, List[int]]], seq_len: int) -> List[Dict[str, List[int]]]:
    """Concatenate encoded examples and cut them into `seq_len`-token chunks (module docstring)."""
    if seq_len < 1:
        raise DataError(f"pack_examples: seq_len must be >= 1, got {seq_len}")
    ids: List[int] = []
    labels: List[int] = []
    for f in encoded:
        ids.extend(f["input_ids"])
        labels.extend(f.get("labels", f["input_ids"]))
    return [{"input_ids": ids[s:s + seq_len], "labels": labels[s:s + seq_len]}
            for s in range(0, len(ids), seq_len)]


class TokenizedDataset(torch.utils.data.Dataset):
    """Encoded features (lists of ids) for a `torch.utils.data.DataLoader` with a `Collator`."""

    def __init__(self, features: Sequence[Dict[str, List[int]]]):
        self.features = list(features)

    @classmethod
    def from_examples(cls, tokenizer: Tokenizer, examples: Sequence[Example], template: str = "default",
                      max_length: Optional[int] = None, truncation: str = "right",
                      pack_to: Optional[int] = None) -> "TokenizedDataset":
        """Encode `examples`; pack them into `pack_to`-token chunks when given.

        Examples left with no trained token by truncation are kept (they add nothing to the loss)
        and counted in a warning.
        """
        feats = [encode_example(tokenizer, ex, template, max_length, truncation) for ex in examples]
        empty = sum(1 for f in feats if all(t == IGNORE_INDEX for t in f["labels"]))
        if empty:
            warnings.warn(f"{empty} of {len(feats)} examples have no trained token after truncation "
                          f"to max_length={max_length}", stacklevel=2)
        return cls(pack_examples(feats, pack_to) if pack_to else feats)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.features[i]
