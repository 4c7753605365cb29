"""Exact-match scoring of generated answers.

`normalize_answer` applies, in order:
  1. strip surrounding whitespace;
  2. cut at the first newline (generation often runs on into a new turn);
  3. collapse every run of whitespace to one space;
  4. remove trailing punctuation and quotes (. , ; : ! ? ' ") and the whitespace before them;
  5. casefold.
So "Vendrath." == "vendrath" but "Vendrath Bay" != "Vendrath", and "85" != "85.0".
`exact_match(pred, ref)` is True when the normalised strings are equal; `ref` may be a list of
references (data-to-text), any of which may match.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

_TRAILING = ".,;:!?'\""


def normalize_answer(text: str) -> str:
    text = text.strip().split("\n", 1)[0]
    text = re.sub(r"\s+", " ", text)
    text = text.rstrip(_TRAILING + " ")
    return text.casefold()


def exact_match(pred: str, ref: Union[str, Sequence[str]]) -> bool:
    refs = [ref] if isinstance(ref, str) else list(ref)
    p = normalize_answer(pred)
    return any(p == normalize_answer(r) for r in refs)
