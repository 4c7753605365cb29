"""Which examples make up each step: a pure function of (seed, step, rank).

The stream of training examples is the concatenation of per-epoch permutations, epoch e drawn
from a generator seeded with (seed, e). Micro-batch k of the run is the k-th slice of
`world_size * batch_size` examples of that stream, and rank r takes the r-th `batch_size` of it;
step s consumes micro-batches s*accum ... s*accum + accum - 1. Because nothing else decides the
order, a resumed run sees exactly the batches the uninterrupted run would have seen, and N ranks
with batch b see the same global batches as one rank with batch N*b (each example once an epoch).
"""
from __future__ import annotations

from typing import Dict, List

import torch


class StepSampler:
    def __init__(self, num_examples: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.n, self.bs, self.accum, self.seed = num_examples, batch_size, grad_accum, seed
        self.rank, self.world = rank, world_size
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch cached
        return self._perms[epoch]

    def _stream(self, start: int, count: int) -> List[int]:
        out = []
        pos = start
        while len(out) < count:
            epoch, off = divmod(pos, self.n)
            take = min(count - len(out), self.n - off)
            out.extend(self._perm(epoch)[off:off + take].tolist())
            pos += take
        return out

    def micro_batches(self, step: int) -> List[List[int]]:
        """Example indices of this rank's micro-batches for optimizer step `step` (0-based)."""
        global_mb = self.world * self.bs
        out = []
        for k in range(step * self.accum, (step + 1) * self.accum):
            chunk = self._stream(k * global_mb, global_mb)
            out.append(chunk[self.rank * self.bs:(self.rank + 1) * self.bs])
        return out

    def global_micro_batches(self, step: int) -> List[List[int]]:
        """All ranks' examples of this step (used to count target tokens for the loss normaliser)."""
        global_mb = self.world * self.bs
        return [self._stream(k * global_mb, global_mb) for k in range(step * self.accum, (step + 1) * self.accum)]

    def epoch_of(self, step: int) -> float:
        return step * self.accum * self.world * self.bs / self.n
