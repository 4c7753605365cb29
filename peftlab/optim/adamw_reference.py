"""Reference AdamW update in plain PyTorch: the twin that the Triton kernel is tested against.

One step of AdamW (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2) for a parameter theta
with gradient g at step t (lr gamma, decay lambda), written exactly as torch.optim.AdamW does it:

    theta <- theta * (1 - gamma * lambda)                     decoupled weight decay
    m     <- m + (1 - beta1) * (g - m)                        (torch.lerp)
    v     <- v * beta2 + (1 - beta2) * g * g
    theta <- theta - gamma / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The bias corrections are computed on the host in double precision, once per parameter and step,
and enter the kernel as float32 scalars (`AdamWScalars`), which is also what PyTorch does with a
Python-float scalar. States m, v are float32; a bf16/fp16 parameter is updated in float32 and
rounded once at the end (torch keeps bf16 states for bf16 params; we do not).

The 8-bit variant (Dettmers et al. 2021, arXiv 2110.02861, Sec. 2) keeps m and v as uint8 codes
of a dynamic map with one float32 absmax per block of 256 elements. A step dequantizes a block,
applies the float32 update above, and re-quantizes with the block's new absmax, as bitsandbytes'
blockwise 8-bit Adam does. Here that is composed from `peftlab.quant.blockwise8`.

Shapes: every tensor argument is a flat 1-D view of one parameter segment of n elements; the
8-bit absmax tensors have ceil(n / 256) entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_BLOCK = 256  # elements per absmax block of the 8-bit states


@dataclass(frozen=True)
class AdamWScalars:
    """Per-parameter, per-step scalars of the update (double precision; cast to fp32 in use)."""

    decay: float      # 1 - lr * weight_decay
    w1: float         # 1 - beta1, the lerp weight of m
    beta2: float
    w2: float         # 1 - beta2
    step_size: float  # lr / (1 - beta1^t)
    bc2_sqrt: float   # sqrt(1 - beta2^t)
    eps: float

    def as_row(self) -> list:
        """The 7 scalars in the order of the kernel's hyper-parameter table."""
        return [self.decay, self.w1, self.beta2, self.w2, self.step_size, self.bc2_sqrt, self.eps]


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  step: int) -> AdamWScalars:
    """The scalars of step `step` (1-based), computed as torch.optim.AdamW computes them."""
    step_f = float(step)
    return AdamWScalars(decay=1 - lr * weight_decay, w1=1 - beta1, beta2=beta2, w2=1 - beta2,
                        step_size=lr / (1 - beta1 ** step_f),
                        bc2_sqrt=(1 - beta2 ** step_f) ** 0.5, eps=eps)


@torch.no_grad()
def adamw_step_reference(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         s: AdamWScalars) -> None:
    """Update p, m, v in place (p: float32/bf16/fp16; g: p's dtype or fp32; m, v: float32)."""
    p32 = p if p.dtype == torch.float32 else p.float()
    g32 = g if g.dtype == torch.float32 else g.float()
    if s.decay != 1.0:
        p32.mul_(s.decay)
    m.lerp_(g32, s.w1)
    v.mul_(s.beta2).addcmul_(g32, g32, value=s.w2)
    denom = (v.sqrt() / s.bc2_sqrt).add_(s.eps)
    p32.addcdiv_(m, denom, value=-s.step_size)
    if p32 is not p:
        p.copy_(p32)


@torch.no_grad()
def adamw8bit_step_reference(p: torch.Tensor, g: torch.Tensor, qm: torch.Tensor, am: torch.Tensor,
                             qv: torch.Tensor, av: torch.Tensor, s: AdamWScalars,
                             code_m: torch.Tensor, code_v: torch.Tensor) -> None:
    """8-bit step: dequantize (qm, am), (qv, av); float32 update; re-quantize in place.

    qm, qv: uint8 [n]; am, av: float32 [ceil(n/256)]; code_m: signed dynamic map [256];
    code_v: unsigned dynamic map [256].
    """
    from ..quant.blockwise8 import dequantize_blockwise_8bit, quantize_blockwise_8bit

    n = p.numel()
    m = dequantize_blockwise_8bit(qm, am, code_m, QUANT_BLOCK, (n,), torch.float32)
    v = dequantize_blockwise_8bit(qv, av, code_v, QUANT_BLOCK, (n,), torch.float32)
    adamw_step_reference(p, g, m, v, s)
    for q, a, x, code in ((qm, am, m, code_m), (qv, av, v, code_v)):
        new_q, new_a = quantize_blockwise_8bit(x, code, blocksize=QUANT_BLOCK)
        q.copy_(new_q.reshape(-1))
        a.copy_(new_a.reshape(-1))

