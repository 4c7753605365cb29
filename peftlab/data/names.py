"""Invented, pronounceable, unique names for the synthetic world.

A name is a chain of syllables (onset + nucleus + optional coda), e.g. "vel" + "dra" + "mor" ->
"Veldramor". One `NameMaker` hands out every name of a world, so no name (and no lower-case word)
repeats across people, places and organisations. Names come from a seeded `random.Random`, so the
same seed gives the same names. A few real words slip through any syllable generator; the
blocklist removes the ones a model is likely to know, and `check_unique` is the final guard.
"""
from __future__ import annotations

import random
from typing import Iterable, List, Set

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "sk",
          "t", "th", "tr", "v", "vr", "z", "st", "h")
NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ae", "ei", "ou", "y")  # plain vowels weighted x2
CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "sh")
# Real names and words the generator can produce and a language model may already know.
BLOCKLIST = frozenset("""
maria mona tina dora nora lena sara laura dana rosa lisa vera vela tara mira kara
dune mars venus tokyo paris roma berlin linda brand stone bread trust dream storm
""".split())


class NameMaker:
    """Deterministic source of unique syllable names."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: Set[str] = set()

    def word(self, min_syll: int = 2, max_syll: int = 3, min_len: int = 4, max_len: int = 10) -> str:
        """A fresh lower-case word of `min_syll`..`max_syll` syllables."""
        for _ in range(10_000):
            n = self.rng.randint(min_syll, max_syll)
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(NUCLEI) +
                        (self.rng.choice(CODAS) if k == n - 1 or self.rng.random() < 0.3 else "")
                        for k in range(n))
            if min_len <= len(w) <= max_len and w not in self.used and w not in BLOCKLIST:
                self.used.add(w)
                return w
        raise RuntimeError("name space exhausted; widen the syllable inventory")

    def name(self, **kw) -> str:
        return self.word(**kw).capitalize()

    def names(self, n: int, **kw) -> List[str]:
        return [self.name(**kw) for _ in range(n)]


def check_unique(names: Iterable[str], what: str) -> None:
    """Raise if any name repeats (case-insensitively)."""
    seen: Set[str] = set()
    for n in names:
        k = n.casefold()
        if k in seen:
            raise ValueError(f"duplicate {what} name {n!r}")
        seen.add(k)
