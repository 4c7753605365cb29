"""Choosing a kernel configuration by timing it, once per key, on the device at hand.

Triton's ``autotune`` fixes the meta-parameters per kernel; here a *candidate* may be a different
kernel (a variant) as well as a tile, and candidates that fail to compile on this Triton/GPU are
skipped instead of failing the call. ``fastest`` is the primitive (used by the 4-bit quantize /
dequantize tuner below and by the GEMV tile choice in ``matmul4bit.py``); ``Tuned`` caches the
winner per key, supports forcing a variant (tests) and reports what ran.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import torch
import triton.testing

T = TypeVar("T")


def fastest(candidates: Sequence[T], time_fn: Callable[[T], float], what: str,
            first_ok: bool = False) -> Tuple[T, List[Tuple[T, float]]]:
    """(the candidate with the least ``time_fn`` in ms, [(candidate, ms)] of all tried).

    A candidate whose ``time_fn`` raises (e.g. out of resources, a layout this Triton rejects) is
    skipped with one warning naming it; with ``first_ok`` the first that runs wins untimed. Raises
    RuntimeError if every candidate fails."""
    best, best_ms, errors, times = None, math.inf, [], []
    for cand in candidates:
        try:
            ms = time_fn(cand)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{getattr(cand, 'describe', lambda: cand)()}: {type(e).__name__}: {e}")
            times.append((cand, math.inf))
            continue
        times.append((cand, ms))
        if ms < best_ms or best is None:
            best, best_ms = cand, ms
        if first_ok:
            break
    if errors:
        warnings.warn(f"{what}: skipped {len(errors)} failing candidate(s), first: {errors[0]}")
    if best is None:
        raise RuntimeError(f"{what}: every candidate failed: {errors}")
    return best, times


def l2_copies(footprint_bytes: int, device, multiple: float, least: int, most: int) -> int:
    """How many copies of a kernel's inputs (``footprint_bytes`` each) together cover about
    ``multiple`` x the L2 cache of ``device`` (50 MB off CUDA), clamped to [least, most]: timing
    calls that rotate through them read their inputs from DRAM, as in a model where other layers
    pass through L2 between two uses of a weight."""
    dev = torch.device(device)
    l2 = (getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
          if dev.type == "cuda" else 50 << 20)
    return max(least, min(most, -(-int(multiple * l2) // max(1, footprint_bytes))))


def graph_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """GPU milliseconds per call of ``fn`` from CUDA-graph replays of ``calls`` calls: no host
    launch cost, which for a kernel of a few microseconds would otherwise be all that
    ``do_bench`` sees. ``fn`` runs twice eagerly first, on the capture stream (compilation, and
    per-stream buffers such as split-K counters get allocated and zeroed for real)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    return float(triton.testing.do_bench(graph.replay, warmup=3, rep=20)) / calls


_UNTIMED = " (untimed: small)"   # the note on picks made below the tuning threshold


def _interpret_knob() -> bool:
    """What ``triton.jit`` consults when it decorates a kernel (Triton >= 3.3: the knob, which
    follows TRITON_INTERPRET; older: the variable itself)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit fixes interpretation when it decorates a kernel, so the value when our kernel
# modules import is the one that holds for their kernels: read once (~1 us per launch saved)
_INTERPRET = _interpret_knob()


def _interpreting(t: torch.Tensor) -> bool:
    return _INTERPRET or not t.is_cuda


class Candidate(NamedTuple):
    variant: str          # quant: "words", "words1", "bytes"; dequant: "tile1", ...
    launch: Callable
    consts: dict          # variant constexprs
    elems: int            # elements per program
    num_warps: int

    def describe(self, elems: Optional[int] = None) -> str:
        return f"{self.variant} ELEMS={self.elems if elems is None else elems} " \
               f"warps={self.num_warps}"


class Tuned:
    """Per key, the fastest eligible candidate on CUDA (each timed once with do_bench; below
    ``_TUNE_MIN`` elements the first eligible one that compiles, untimed); a candidate that
    raises is skipped with a warning. The interpreter runs the first eligible candidate on an
    ``interp_elems`` tile. Every candidate rewrites all outputs, so trials are side-effect free.
    ``force`` = (variant, elems, warps) pins a variant where it is eligible."""

    def __init__(self, op: str, candidates: Sequence[Candidate], interp_elems: int = 1024):
        self.op, self.candidates, self.interp_elems = op, list(candidates), interp_elems
        self.best: Dict[tuple, Candidate] = {}
        self._last: Optional[tuple] = None   # (candidate, elems, note) of the last call
        self.force = None

    @property
    def last(self) -> Optional[str]:
        """What the last call ran: ``"<variant> ELEMS=<e> warps=<w>"`` (+ a note)."""
        if self._last is None:
            return None
        cand, elems, note = self._last
        return cand.describe(elems) + note

    def pick(self, key, eligible, time_fn: Callable[[Candidate], float],
             first_ok: bool = False) -> Candidate:
        """The eligible candidate with the least ``time_fn`` (ms; with ``first_ok`` the first
        for which it does not raise), cached per key."""
        if key not in self.best:
            pool = [c for c in self.candidates if c.variant in eligible]
            self.best[key], _ = fastest(pool, time_fn, f"4-bit {self.op}", first_ok)
        return self.best[key]

    def __call__(self, key, eligible, tune: bool, *args, **kwargs):
        cand = None if self.force else self.best.get((*key, tune))
        if cand is not None and not _interpreting(args[0]):   # the common case: a known key
            self._last = (cand, None, "" if tune else _UNTIMED)
            self._run(cand, None, args, kwargs)
            return
        pool = [c for c in self.candidates if c.variant in eligible]
        interp = _interpreting(args[0])
        elems, note = (self.interp_elems, " (interpreted)") if interp else (None, "")
        forced = [c for c in pool if self.force and c.variant == self.force[0]]
        if forced:
            elems = self.force[1] or elems
            cand = forced[0]._replace(num_warps=self.force[2] or forced[0].num_warps)
        elif interp or self.force:  # forced but ineligible: first eligible, untimed
            cand = pool[0]
        else:
            def time_fn(c):
                if not tune:
                    self._run(c, None, args, kwargs)
                    return 0.0
                return triton.testing.do_bench(lambda: self._run(c, None, args, kwargs),
                                               warmup=5, rep=20)
            # keyed by `tune` too: a size bucket straddles _TUNE_MIN, and an untimed pick for a
            # small tensor must not stand in for the timed one of a large tensor
            cand = self.pick((*key, tune), eligible, time_fn, first_ok=not tune)
            note = "" if tune else _UNTIMED
        self._last = (cand, elems, note)
        self._run(cand, elems, args, kwargs)

    @staticmethod
    def _run(cand: Candidate, elems, args, kwargs):
        cand.launch(*args, ELEMS=cand.elems if elems is None else elems, **cand.consts,
                    **kwargs, num_warps=cand.num_warps)
