"""Fused elementwise pieces of the decoder: SwiGLU, RMSNorm and rotary embeddings as autograd Functions.

Why: PyTorch's autograd runs these expressions op by op; every op reads its inputs and writes a
fresh output, and the graph keeps intermediates that backward reads again. The Functions below
compute the same values (to rounding) with fewer passes over memory, fewer temporaries and fewer
saved tensors, using only existing ATen kernels (so they run on any device). A "pass" is one read
or write of a full-size tensor; broadcast vectors ([N, 1], [d], [B, 1, T, D]) are not counted.
On a 2-core CPU (the bench_lora step: Llama d=256, I=688, 6 layers, 8 x 256 tokens, LoRA r=8)
a product of two [8, 256, 688] float32 tensors takes 1.1 ms inside the step against 0.63 ms
alone, so the passes cost more than their arithmetic. (torch.profiler reports ~5 ms for that op in
the same step, timed directly 1.1 ms: check profiler rows of large elementwise ops by timing them.)

SwiGLU (Shazeer 2020, arXiv 2002.05202, §2, FFN_SwiGLU), g, u, h [.., I]:

    h = silu(g) ⊙ u,   silu(g) = g σ(g),   silu'(g) = σ(g) (1 + g (1 - σ(g)))
    dL/dg = dh ⊙ u ⊙ silu'(g),   dL/du = dh ⊙ silu(g)

  The forward saves s = silu(g) and q = u ⊙ silu'(g) (one `silu_backward(u, g)` kernel) instead
  of g, u and s, so the backward is two products, dL/dg = dh ⊙ q and dL/du = dh ⊙ s.
  Passes: autograd 5 forward + 9 backward (3 saved tensors); here 8 + 6 (2 saved tensors): the
  extra work moves to the forward, where g and u are fresh from the GEMM.

RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467, §3), x, y [N, d], weight w [d]:

    r = (mean_j x_j² + eps)^(-1/2)  [N],   x̂ = r x,   y = w ⊙ x̂   (HF's order: w · (x r))
    ∂r/∂x_j = -r³ x_j / d, so with ĝ = dy ⊙ w and k = Σ_j ĝ_j x_j  [N]:
    dL/dx = r ĝ - (r³ k / d) x = r (ĝ - (r² k / d) x),     dL/dw = Σ_n dy_n ⊙ x̂_n

  Σ x² comes from one `vector_norm` reduction (no [N, d] square), k from a batched row dot
  (bmm), and the last line is one in-place `addcmul_` and one `mul_`. Passes: autograd 7 forward
  + about 19 backward (9 ops); here 5 + 9 (+ 4 when w needs a gradient). Only for float32 and
  float64 (x and w of one dtype; float64 stays float64, where HF normalises in float32): a
  16-bit input takes the plain expression, as HF computes it (float32, rounded, then weighted).

Rotary embedding (Su et al. 2021, arXiv 2104.09864, §3.4.2, eq. 34), x [.., D], halves [x₁, x₂]:

    y = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half(x) = [-x₂, x₁]
      = [x₁ c₁ - x₂ s₁,  x₂ c₂ + x₁ s₂]                   (c = [c₁, c₂], s = [s₁, s₂])
    dL/dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin),  rotate_halfᵀ(v) = [v₂, -v₁]
      = [dy₁ c₁ + dy₂ s₂,  dy₂ c₂ - dy₁ s₁]

  Each direction is one product and two half-width `addcmul_` (5 passes), where neg, cat, two
  products and a sum took 10, and the backward nothing saved but cos and sin.

Measured: the peftlab training step alone (fwd + bwd + AdamW), interleaved A/B in one process,
plain expressions vs these Functions: -9 to -10 % with all three (1 and 2 threads); leaving one
out at a time, rotary is worth 4.5-6.5 %, RMSNorm 2.7-3.5 %, SwiGLU 0.4-2.4 % (it also keeps 2
instead of 3 [.., I] tensors per layer for backward). experiments/bench_lora.py, HF time /
peftlab time: 1.20-1.22 before, 1.25-1.28 after at 1 thread; 1.21-1.26 before, 1.26-1.34 after
at 2 threads (that ratio moves with the load other processes put on the 2-core machine).
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable


def _wants_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# --- SwiGLU -----------------------------------------------------------------------------------
class SwiGLUFn(torch.autograd.Function):
    """h = silu(g) ⊙ u; backward dL/dg = dh ⊙ q, dL/du = dh ⊙ s with s, q saved (module docstring)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.silu(g)
        h = s * u
        need_g, need_u = ctx.needs_input_grad
        q = torch.ops.aten.silu_backward(u, g) if need_g else None  # u ⊙ silu'(g)
        ctx.save_for_backward(s if need_u else None, q)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor):
        s, q = ctx.saved_tensors
        return (None if q is None else dh * q), (None if s is None else dh * s)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) ⊙ u for same-shape, same-dtype g, u [.., I]; anything else takes the plain expression."""
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        return torch.nn.functional.silu(g) * u
    if not _wants_grad(g, u):
        return torch.nn.functional.silu(g).mul_(u)
    return SwiGLUFn.apply(g, u)


# --- RMSNorm ----------------------------------------------------------------------------------
def _no_autocast(t: torch.Tensor):
    """A context in which GEMMs on t's device keep t's dtype (autocast would lower them to 16 bits)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_nj b_nj for a, b [N, d] -> [N], as N 1×d·d×1 products (no [N, d] temporary)."""
    with _no_autocast(a):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _rms_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    """(r [N], y = w ⊙ (x r) [N, d]) for rows x2 [N, d]: one reduction, one product, one in place."""
    r = torch.linalg.vector_norm(x2, dim=-1).square_().div_(x2.shape[-1]).add_(eps).rsqrt_()
    return r, (x2 * r[:, None]).mul_(weight)


class RMSNormFn(torch.autograd.Function):
    """y = w ⊙ (x r), r = (mean x² + eps)^(-1/2) per row; backward derived in the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        r, y = _rms_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, r)
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, weight, r = ctx.saved_tensors
        shape, d = dy.shape, x2.shape[-1]
        dy2 = dy.reshape(-1, d)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            with _no_autocast(dy):
                dw = (dy2 * x2).t().mv(r)                       # Σ_n dy_n x_n r_n
        if ctx.needs_input_grad[0]:
            gh = dy2 * weight                                   # ĝ = dy ⊙ w
            c = _row_dot(gh, x2).mul_(r).mul_(r).div_(d)        # r² k / d  [N]
            dx = gh.addcmul_(x2, c[:, None], value=-1).mul_(r[:, None]).view(shape)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w ⊙ x / sqrt(mean(x²) + eps) over the last dimension, as HF's LlamaRMSNorm computes it.

    float32/float64 x with a weight of the same dtype and device go through `RMSNormFn` (float64
    stays float64, where HF would normalise in float32); other dtypes (16-bit: normalised in
    float32, rounded, then weighted, as HF does) through the plain expression.
    """
    if x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and weight.device == x.device:
        if not _wants_grad(x, weight):
            return _rms_forward(x.reshape(-1, x.shape[-1]), weight, eps)[1].view(x.shape)
        return RMSNormFn.apply(x, weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


# --- rotary embedding ---------------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Forward (sign +1): [x₁ c₁ - x₂ s₁, x₂ c₂ + x₁ s₂]; backward (sign -1, x = dy):
    [dy₁ c₁ + dy₂ s₂, dy₂ c₂ - dy₁ s₁]. One product, then two in-place half-width addcmul_."""
    h = x.shape[-1] // 2
    y = x * cos
    if sign > 0:   # y₁ -= x₂ s₁, y₂ += x₁ s₂
        y[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        y[..., h:].addcmul_(x[..., :h], sin[..., h:])
    else:          # dx₁ += dy₂ s₂, dx₂ -= dy₁ s₁
        y[..., :h].addcmul_(x[..., h:], sin[..., h:])
        y[..., h:].addcmul_(x[..., :h], sin[..., :h], value=-1)
    return y


class RotaryFn(torch.autograd.Function):
    """y = x ⊙ cos + rotate_half(x) ⊙ sin; dL/dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin) (see above)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1.0), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by angle pos·θ_i: x ⊙ cos + rotate_half(x) ⊙ sin.

    x [B, h, T, D]; cos, sin broadcastable to it ([B, 1, T, D]). float32/float64 with a table of
    x's dtype go through `RotaryFn`; a table that needs a gradient or would widen x, a dtype that
    would promote, and 16-bit x (where `addcmul_` would round once where HF rounds twice) take the
    plain expression.
    """
    if (x.dtype not in (torch.float32, torch.float64) or cos.dtype != x.dtype or sin.dtype != x.dtype
            or cos.requires_grad or sin.requires_grad
            or torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    if not _wants_grad(x):
        return _rotate(x, cos, sin, 1.0)
    return RotaryFn.apply(x, cos, sin)
