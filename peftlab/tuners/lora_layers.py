"""LoRA layers: a frozen base layer plus named low-rank adapters beside it.

                 ┌──────────── base_layer (frozen W0, nn.Linear or 4-bit Linear4bit) ─────────┐
    x [.., in] ──┤                                                                            + ──> h [.., out]
                 └─ dropout ─> lora_A[a] (r × in) ─> lora_B[a] (out × r) ─> × s ─────────────┘

    h = W0 x + s · B A dropout(x),   s = alpha / r   (Hu et al. 2021, arXiv 2106.09685, §4.1, eq. 3)
                                     s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)

Fast path (training and prefill, `_LoraGroupFn`): where a layer runs one plain LoRA adapter on
a frozen float32/float64 nn.Linear (no dropout in effect, no DoRA, nothing merged, one active
adapter, no hooks, enough rows of x; `_fast_adapter` lists the conditions), the forward is one GEMM with the adapted
weight formed on the fly, h = x (W0 + s B A)ᵀ + b, inside one autograd node whose backward is
written out (dL/dx = g (W0 + s B A), dL/dA = s (g B)ᵀ x, dL/dB = s gᵀ (x Aᵀ)). Layers that read
the same input (q/k/v; gate/up: models/llama.py `project`) share the node:
its forward appends [A_1; ..; A_n] to the last layer's adapted weight, so that one GEMM also yields
the xa = x Aᵀ the backward needs, and its backward forms (g B)ᵀ x for all of them in one GEMM and
accumulates dL/dx in place. Parameters, state dicts and files are those of the plain layers; anything else takes
the plain path below. Measured on a 2-core CPU (the model and step of experiments/bench_lora.py:
Llama d=256, 6 layers, 2048 tokens, r=8 on all linears), fast vs plain path interleaved: training
step 649 vs 721 ms at 1 thread, 363 vs 411 ms at 2 threads (-10 %).

Initialisation (as HF PEFT): A Kaiming-uniform with a = sqrt(5) (the nn.Linear default: U(±1/sqrt(in)))
or Gaussian N(0, 1/r²); B = 0, so the adapted model starts exactly at the base model.

DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5) splits the adapted weight into a magnitude vector m
(one entry per output row, HF key `lora_magnitude_vector`, initialised to ||W0||) and a direction:

    W' = m ⊙ (W0 + s B A) / ||W0 + s B A||          ||·|| the L2 norm of each output row [out]
    h  = W' x + b,  computed as  W0 x + b + (m/n - 1) ⊙ W0 x' + (m/n) ⊙ s B A x'
                    (n the norm, x' = dropout(x); the two agree without dropout)

The paper's column norm ||·||_c (its weights are d × k, in × out) is, for PyTorch's [out, in]
layout, the norm over the input dimension: one value per output feature, as HF PEFT computes it.
The norm n is treated as a constant in backpropagation (§4.3): it is recomputed every step but
detached, so dL/dm = Σ (dL/dh) ⊙ (W0 x' + s B A x') / n, and A, B get gradients only through the
(m/n) s B A x' term. Written this way (HF PEFT's form) the base output is reused, and with dropout
the base term is recomputed on x'. Outputs and gradients equal HF PEFT's.

PiSSA (Meng et al. 2024, arXiv 2404.02948, §3): W0 = U S Vᵀ; with the top-r triplets
A = sqrt(S_r / s) V_rᵀ, B = U_r sqrt(S_r / s) (so s B A = U_r S_r V_rᵀ), and the frozen base becomes
the residual W0 - s B A. The output is unchanged at initialisation. "pissa_niter_N" uses
torch.svd_lowrank with N subspace iterations (Halko et al. 2011) instead of the full SVD.

Embedding LoRA (PEFT's convention): A [r, vocab] = 0, B [dim, r] ~ N(0, 1);
h = E[x] + s · (Aᵀ[x]) Bᵀ.

Merging adds each merged adapter's term to W0: s B A for LoRA, (m/n - 1) ⊙ W0 + (m/n) ⊙ s B A for
DoRA (n from W0, exactly as the forward computes it), so merged and unmerged outputs agree for any
set of active adapters. The pre-merge weight is kept aside and put back by `unmerge`, which is
therefore exact in every dtype (subtracting the delta again would not be). Merging into a 4-bit
base writes a dequantized dense layer (`DequantizedLinear`, in the compute dtype):
W = dequant(Q(W0)) + Σ terms. Nothing is re-quantized, so no new quantization error appears, but
the layer is 16/32-bit sized, and the sum is rounded once to the compute dtype. Measured on a
512 × 512 NF4 layer with r = 8: merged vs unmerged relative output error 4e-7 with float32
compute and 3.7e-3 with bfloat16 (its 2⁻⁸ precision), against 9e-2 for QLoRA vs the
full-precision layer (the NF4 error itself, random weights). While merged, the pre-merge weight
stays where it was (a later `.to(device)` does not move it).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import AdapterError, ConfigError
from ..modhooks import global_module_hooks, has_module_hooks
from .lora_config import LoraConfig


# --- base layers ------------------------------------------------------------------------------
def is_quantized(base: nn.Module) -> bool:
    """A base layer whose weight is stored packed (Linear4bit): merging or PiSSA must dequantize."""
    from ..quant.state import QuantState

    # Recognised by its quant state, not its weight's dtype: under FSDP the packed bytes are
    # stored in a float dtype (Linear4bit.set_quant_storage).
    return isinstance(getattr(base, "quant_state", None), QuantState)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] (or [vocab, dim]) tensor."""
    if is_quantized(base):
        return base.dequantize().reshape(base.out_features, base.in_features)
    return base.weight


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters live in float32 (float64 for a float64 base), as PEFT's default autocast does."""
    w = getattr(base, "weight", None)
    return torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _device(base: nn.Module) -> torch.device:
    w = getattr(base, "weight", None)  # a Linear4bit keeps its packed weight as a buffer
    return w.device if isinstance(w, torch.Tensor) else next(iter(base.parameters())).device


class DequantizedLinear(nn.Linear):
    """What a 4-bit base becomes when merged: a dense nn.Linear that, like Linear4bit, computes in
    its weight's dtype (the compute dtype) and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def _add_low_rank(result: torch.Tensor, xa: torch.Tensor, lora_B: nn.Linear, s: float) -> torch.Tensor:
    """result + s · B (A x), given xa = A x [.., r] (the plain path, where `_LoraGroupFn` does not apply).

    Same value as `result + lora_B(xa) * s` (bit for bit when s is a power of two, else to rounding),
    cheaper: the scale multiplies the r-wide xa instead of the out-wide product, and the add rides in
    the GEMM (addmm, beta = 1), so no [.., out] elementwise pass is left in forward or backward.
    Measured on a 2-core CPU: -22 % for one 256 -> 688 LoRA layer (forward + backward, 2048 tokens),
    -10 % for a whole LoRA training step (experiments/bench_lora.py). When the dtypes differ it
    falls back to the plain add (PyTorch's type promotion).
    """
    B = lora_B.weight
    xs = xa if s == 1 else xa * s
    if result.dtype != B.dtype or xs.dtype != B.dtype:
        return result + lora_B(xs)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xs.reshape(-1, xs.shape[-1]), B.t())
    return out.view(result.shape)


# --- fast path: LoRA layers that read one input, as one autograd node ----------------------------
class _LoraGroupFn(torch.autograd.Function):
    """y_i = x (W_i + s_i B_i A_i)ᵀ + b_i for n LoRA layers reading the same x [N, in].

    The adapted weight W'_i = W_i + s_i B_i A_i [out_i, in] costs out_i · in · r_i multiply-adds to
    form, against N · in · out_i for the GEMM with x (N = 2048 tokens: 0.4 %), so each layer runs
    one GEMM, as the base layer alone would. W'_i is formed again in backward rather than kept.

    Forward: the last layer's GEMM also yields xa = x [A_1; ..; A_n]ᵀ [N, R] (R = Σ r_i), which the
    backward needs: [y_n | xa] = x [W'_n; A_1; ..; A_n]ᵀ + [b_n | 0], so the backward does not read
    x again for it (R more columns in a GEMM where x is already in cache). y_n is returned as a
    column view of that result, detached (a plain tensor to autograd, so in-place ops on it stay
    allowed); xa is cloned (its own tensor and version counter) and saved. Only when grad mode is on
    and some B_i needs a gradient; otherwise (inference) every output is a contiguous GEMM result.
    Held memory grows by 2 N R (the clone and the xa columns kept with y_n; R = 24 against Σ out_i = 768 for
    q/k/v at r = 8). Measured on experiments/bench_lora.py's step (old vs this forward interleaved,
    2-core CPU, another job on the machine): -0.4..-1.4 % at 1 thread, -2..-3 % at 2 threads.
    Not kept, measured no faster: all outputs as column views of ONE GEMM x [W'_1; ..; W'_n; A..]ᵀ
    (-1 % at 1 thread, ±1 % at 2), xa from its own GEMM in the forward, and folding u_i = s_i g_i B_i into the backward's g_i W'_i
    GEMM (zero-padded [W'_i | s_i B_i]).

    Backward, with g_i = dL/dy_i [N, out_i] and W_i, b_i frozen:

        dL/dx   = Σ_i g_i W'_i                                [N, in], accumulated in place
        u_i     = s_i g_i B_i,   u = [u_1 .. u_n]             [N, R], R = Σ r_i
        dL/dA_i = (uᵀ x) rows of adapter i                    [r_i, in]
        dL/dB_i = s_i g_iᵀ xa_i,  xa = x [A_1; ..; A_n]ᵀ      [out_i, r_i]  (xa from the forward)

    The same value as x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ up to float32 rounding of W'_i (relative
    ~1e-7 of the output), hence only for float32/float64 weights: in 16-bit, W'_i would round the
    small s B A away. The plain form costs per layer two more thin GEMMs and an [N, out] pass in
    each direction, plus an add per extra reader of x in backward.
    """

    @staticmethod
    def forward(ctx, x, scalings, grad_mode, *tensors):
        n = len(scalings)
        W, b, A, B = (tensors[k * n:(k + 1) * n] for k in range(4))
        # needs_input_grad holds requires_grad even under no_grad: grad_mode is the caller's mode
        rank = sum(a.shape[0] for a in A) if grad_mode and any(ctx.needs_input_grad[3 + 3 * n:]) else 0
        ys, xa = [], None
        for i in range(n):
            w = torch.addmm(W[i], B[i], A[i], alpha=scalings[i])
            if i == n - 1 and rank:  # x [W'_n; A_1; ..; A_n]ᵀ: y_n and xa from one GEMM
                out = w.shape[0]
                w = torch.cat((w, *A))
                bias = None if b[i] is None else torch.cat((b[i], b[i].new_zeros(rank)))
                y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
                xa = y[:, out:].clone()  # its own tensor: the outputs may be modified in place
                ys.append(y[:, :out].detach())  # detached: to autograd not a view, in-place ops allowed
            else:
                ys.append(torch.mm(x, w.t()) if b[i] is None else torch.addmm(b[i], x, w.t()))
        ctx.scalings = scalings
        ctx.set_materialize_grads(False)  # an output unused by the loss comes back as None
        ctx.save_for_backward(x, xa, *W, *A, *B)
        return tuple(ys)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, xa, *WAB = ctx.saved_tensors
        scalings, n = ctx.scalings, len(ctx.scalings)
        W, A, B = WAB[:n], WAB[n:2 * n], WAB[2 * n:]
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3 + 2 * n:3 + 3 * n], \
            ctx.needs_input_grad[3 + 3 * n:]
        offs = [0]
        for a in A:
            offs.append(offs[-1] + a.shape[0])
        u = x.new_zeros(x.shape[0], offs[-1]) if any(need_A) else None
        gx, gA, gB = None, [None] * n, [None] * n
        for i, g in enumerate(grads):
            if g is None:
                continue
            s, cols = scalings[i], slice(offs[i], offs[i + 1])
            if need_x:
                w = torch.addmm(W[i], B[i], A[i], alpha=s)
                gx = torch.mm(g, w) if gx is None else gx.addmm_(g, w)
            if u is not None:
                u[:, cols].addmm_(g, B[i], alpha=s)
            if need_B[i]:  # (xa_iᵀ g_i)ᵀ, not g_iᵀ xa_i: same value, half the time on the CPU (2048 rows)
                gB[i] = torch.mm(xa[:, cols].t(), g).t().mul_(s)
        if u is not None:
            gA_cat = torch.mm(u.t(), x)
            # a layer whose output took no part in the loss gets None, as autograd gives it
            gA = [gA_cat[offs[i]:offs[i + 1]] if need_A[i] and grads[i] is not None else None
                  for i in range(n)]
        return (gx, None, None, *[None] * (2 * n), *gA, *gB)


def _fast_adapter(layers, x: torch.Tensor) -> Optional[str]:
    """The one adapter `_LoraGroupFn` may compute for `layers` on input x, or None (plain path).

    It applies when every layer is a LoraLinear with exactly one active adapter (the same name on
    all), not merged, not disabled, plain LoRA (no DoRA), no dropout in effect (p = 0 or eval), on a
    plain nn.Linear base whose weight and bias are frozen, with base, adapters and x of one dtype and
    device, no autocast, and no module hooks (hooks run only when each module is called) — and
    when it pays: forming W' costs out·in·r multiply-adds whatever the number of rows N of x,
    while it saves the plain path's two thin GEMMs, N·r·(in + out). So it needs
    N·(in + out) >= in·out (N >= in/2 for a square layer): training and prefill batches, not
    token-by-token decoding, where W' would cost up to r times the layer's own GEMM."""
    if (type(x) is not torch.Tensor or x.dim() < 2 or torch.is_autocast_enabled(x.device.type)
            or global_module_hooks()):
        return None
    name = None
    rows = x.numel() // max(1, x.shape[-1])
    for m in layers:
        if not isinstance(m, LoraLinear) or m.disabled or m.merged_adapters or len(m.active_adapters) != 1:
            return None
        if rows * (m.in_features + m.out_features) < m.in_features * m.out_features:
            return None  # too few rows: forming W' would cost more than it saves
        a, base = m.active_adapters[0], m.base_layer
        if (name not in (None, a) or type(base) is not nn.Linear or a in m.lora_magnitude_vector
                or m.in_features != x.shape[-1]):
            return None
        name, drop = a, m.lora_dropout[a]
        no_drop = isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (not drop.training or drop.p == 0))
        if not no_drop:
            return None
        if any(has_module_hooks(mod) for mod in (m, base, m.lora_A[a], m.lora_B[a], drop)):
            return None
        frozen = (base.weight,) + (() if base.bias is None else (base.bias,))
        if any(p.requires_grad for p in frozen) or m.lora_A[a].bias is not None or m.lora_B[a].bias is not None:
            return None
        for p in frozen + (m.lora_A[a].weight, m.lora_B[a].weight):
            if type(p) is not nn.Parameter or p.dtype != x.dtype or p.device != x.device \
                    or p.dtype not in (torch.float32, torch.float64):
                return None
    return name


def lora_forward_group(layers, x: torch.Tensor) -> Optional[List[torch.Tensor]]:
    """[layer(x) for layer in layers] through one `_LoraGroupFn` node, or None where it does not
    apply (see `_fast_adapter`); the caller then calls the layers one by one. Parameters, state
    dicts and adapter files are untouched: the grouping exists only during this call."""
    a = _fast_adapter(layers, x)
    if a is None:
        return None
    lead = x.shape[:-1]
    ys = _LoraGroupFn.apply(x.reshape(-1, x.shape[-1]), tuple(m.scaling[a] for m in layers),
                            torch.is_grad_enabled(), *(m.base_layer.weight for m in layers),
                            *(m.base_layer.bias for m in layers),
                            *(m.lora_A[a].weight for m in layers), *(m.lora_B[a].weight for m in layers))
    return [y.view(*lead, y.shape[-1]) for y in ys]


# --- shared adapter bookkeeping -----------------------------------------------------------------
class LoraLayer(nn.Module):
    """What LoraLinear and LoraEmbedding share: adapter names, activity, merge and unmerge."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []
        self.disabled = False
        # from before merging: the weight tensor, or (module,) for a 4-bit base (the tuple keeps the
        # stashed module out of the state dict and out of model.modules())
        self._pre_merge = None
        self._pissa_init: Dict[str, tuple] = {}  # adapter -> (A0, B0) for PiSSA→LoRA conversion

    @property
    def adapter_names(self) -> List[str]:
        return list(self.r)

    def _check_unmerged(self, what: str) -> None:
        if self.merged_adapters:
            raise AdapterError(f"cannot {what} while adapters {self.merged_adapters} are merged; unmerge first")

    def delete_adapter(self, name: str) -> None:
        self._check_unmerged(f"delete adapter '{name}'")
        for attr in ("r", "lora_alpha", "scaling", "_pissa_init"):
            getattr(self, attr).pop(name, None)
        for attr in self._adapter_dicts:
            d = getattr(self, attr)
            if name in d:
                del d[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: List[str]) -> None:
        """Activate `names` (those this layer holds). Merged adapters are unmerged first unless they
        are exactly the new active set (as HF PEFT's set_adapter does): a merged adapter that is no
        longer active must leave the weight, one that stays merged must not run twice."""
        active = [n for n in names if n in self.r]
        if self.merged_adapters and set(self.merged_adapters) != set(active):
            self.unmerge()
        self.active_adapters = active

    def _pending(self) -> List[str]:
        """Active adapters that are not merged (the forward adds them); refuses mixed states."""
        inactive = [a for a in self.merged_adapters if a not in self.active_adapters]
        if inactive:
            raise AdapterError(f"adapters {inactive} are merged into the weight but not active; unmerge first")
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if pending and self.merged_adapters:
            raise AdapterError(f"adapters {self.merged_adapters} are merged while {pending} are active and "
                               "unmerged; unmerge first (or merge them too)")
        return pending

    # --- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False, where: str = "") -> None:
        """Fold adapters into the base weight (all active ones by default); see the module docstring."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        missing = [a for a in names if a not in self.r]
        if missing and adapter_names is not None:
            raise AdapterError(f"{where}: no adapter(s) {missing} here (have {self.adapter_names})")
        names = [a for a in names if a in self.r and a not in self.merged_adapters]
        if not names:
            return
        w0 = self._original_weight()
        work = w0.to(_work_dtype(w0))
        merged = work.clone()
        for a in self.merged_adapters + names:
            merged += self.merge_term(a, work)
        if safe_merge and not torch.isfinite(merged).all():
            raise AdapterError(f"{where}: merging adapter(s) {names} gives non-finite weights; not merged")
        self._install_merged(merged)
        self.merged_adapters += names

    def unmerge(self) -> None:
        """Put the pre-merge weight back (bit for bit)."""
        if not self.merged_adapters:
            return
        saved, self._pre_merge = self._pre_merge, None
        if isinstance(saved, tuple):
            self.base_layer = saved[0]
        else:
            self.base_layer.weight.data = saved
        self.merged_adapters = []

    def _original_weight(self) -> torch.Tensor:
        if self._pre_merge is None:
            return dense_weight(self.base_layer).detach()
        if isinstance(self._pre_merge, tuple):
            return dense_weight(self._pre_merge[0]).detach()
        return self._pre_merge

    def _install_merged(self, merged: torch.Tensor) -> None:
        base = self._pre_merge[0] if isinstance(self._pre_merge, tuple) else self.base_layer
        if is_quantized(base):
            dtype = getattr(base, "compute_dtype", None) or dense_weight(base).dtype
            dense = DequantizedLinear(base.in_features, base.out_features, bias=False, device=merged.device,
                                      dtype=dtype)
            dense.weight.requires_grad_(False)
            dense.weight.data = merged.to(dtype)
            dense.bias = base.bias  # the same Parameter (trainable with bias="all")
            if self._pre_merge is None:
                self._pre_merge = (base,)
            self.base_layer = dense
        else:
            if self._pre_merge is None:
                self._pre_merge = base.weight.data
            base.weight.data = merged.to(self._pre_merge.dtype)

    def merged_base_layer(self) -> nn.Module:
        """The base layer to keep when the LoRA layer is unloaded (merged weights if merged)."""
        self._pre_merge = None
        return self.base_layer

    def original_base_layer(self) -> nn.Module:
        self.unmerge()
        return self.base_layer


# --- linear -----------------------------------------------------------------------------------
class LoraLinear(LoraLayer):
    """LoRA (and DoRA) around any layer exposing in_features, out_features and forward(x).

    Holds `base_layer`, `lora_A[a]` (nn.Linear in→r), `lora_B[a]` (nn.Linear r→out),
    `lora_dropout[a]` and, for DoRA, `lora_magnitude_vector[a]` [out], so that state-dict keys read
    `...q_proj.lora_A.<adapter>.weight` as HF PEFT's do. The forward takes the fast path of the
    module docstring where it applies; `forward_group(layers, x)` does so for several layers at once.
    """

    _adapter_dicts = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    forward_group = staticmethod(lora_forward_group)  # several layers on one input (models/llama.py)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    def update_layer(self, name: str, config: LoraConfig, where: str = "") -> None:
        """Add adapter `name` with the hyperparameters and initialisation of `config`."""
        self._check_unmerged(f"add adapter '{name}'")
        r, base = config.r, self.base_layer
        dtype, device = adapter_dtype(base), _device(base)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, config.lora_alpha, config.scaling
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        init = config.init_lora_weights
        if device.type != "meta":
            if config.is_pissa:
                self._pissa_init_(name, config, where)
            elif init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1.0 / r)
                nn.init.zeros_(self.lora_B[name].weight)
            # init False: keep nn.Linear's random init for both (a non-trivial adapter, for tests)
        if config.use_dora:
            with torch.no_grad():
                mag = self._row_norm(name, dense_weight(base).detach()) if device.type != "meta" else \
                    torch.empty(self.out_features, device=device, dtype=dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(mag.to(dtype))

    def _pissa_init_(self, name: str, config: LoraConfig, where: str) -> None:
        base, r, s = self.base_layer, config.r, config.scaling
        if is_quantized(base):
            raise ConfigError(f"{where}: PiSSA needs a full-precision base layer (initialise PiSSA on the "
                              "float model, then quantize the residual: QPiSSA)")
        w = base.weight.detach()
        if r > min(w.shape):
            raise ConfigError(f"{where}: PiSSA rank r={r} exceeds min(out, in) = {min(w.shape)}")
        work = w.to(_work_dtype(w))
        niter = config.pissa_niter
        if niter is None:
            U, S, Vh = torch.linalg.svd(work, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(work, q=r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S / s)
        A = root[:, None] * Vh             # [r, in]
        B = U * root[None, :]              # [out, r]
        dtype = self.lora_A[name].weight.dtype
        self.lora_A[name].weight.data = A.to(dtype).contiguous()
        self.lora_B[name].weight.data = B.to(dtype).contiguous()
        base.weight.data = (work - s * (B @ A)).to(w.dtype)
        self._pissa_init[name] = (self.lora_A[name].weight.detach().clone(), self.lora_B[name].weight.detach().clone())

    # --- math ---------------------------------------------------------------------------------
    def lora_weight(self, name: str) -> torch.Tensor:
        """B A [out, in] (unscaled)."""
        return self.lora_B[name].weight @ self.lora_A[name].weight

    def _row_norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A|| per output row, [out] (the DoRA denominator, no gradient)."""
        lw = self.lora_weight(name).detach()
        w = w0.to(lw.dtype)
        return torch.linalg.norm(w + self.scaling[name] * lw, dim=1)

    def merge_term(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        delta = self.scaling[name] * self.lora_weight(name).detach().to(w0.dtype)
        if name not in self.lora_magnitude_vector:
            return delta
        n = torch.linalg.norm(w0 + delta, dim=1)
        ratio = (self.lora_magnitude_vector[name].detach().to(w0.dtype) / n)[:, None]
        return (ratio - 1) * w0 + ratio * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            self.unmerge()
            return self.base_layer(x)
        fast = lora_forward_group((self,), x)
        if fast is not None:
            return fast[0]
        result = self.base_layer(x)
        pending = self._pending()
        if not pending:
            return result
        out_dtype, base_out = result.dtype, result
        for a in pending:
            lora_A, lora_B, drop, s = self.lora_A[a], self.lora_B[a], self.lora_dropout[a], self.scaling[a]
            xa = x.to(lora_A.weight.dtype)
            if a in self.lora_magnitude_vector:
                result = result + self._dora_delta(a, xa, base_out)
            else:
                result = _add_low_rank(result, lora_A(drop(xa)), lora_B, s)
        return result.to(out_dtype)

    def _dora_delta(self, a: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(m/n - 1) ⊙ W0 x' + (m/n) ⊙ s B A x' with n detached (DoRA §4.3)."""
        drop, s = self.lora_dropout[a], self.scaling[a]
        w0 = dense_weight(self.base_layer).to(x.dtype)
        n = self._row_norm(a, w0).detach()
        ratio = (self.lora_magnitude_vector[a] / n).view(1, -1)
        if isinstance(drop, nn.Identity) or not self.training:
            xd = x
            bias = self.base_layer.bias
            base = base_out if bias is None else base_out - bias
        else:
            xd = drop(x)
            base = F.linear(xd, w0)
        return (ratio - 1) * base + ratio * self.lora_B[a](self.lora_A[a](xd)) * s

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}"


# --- embedding --------------------------------------------------------------------------------
class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: h = E[x] + s · (Aᵀ[x]) Bᵀ, A [r, vocab] = 0, B [dim, r] ~ N(0, 1)."""

    _adapter_dicts = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def weight(self) -> torch.Tensor:  # for code that reads get_input_embeddings().weight
        return self.base_layer.weight

    def update_layer(self, name: str, config: LoraConfig, where: str = "") -> None:
        self._check_unmerged(f"add adapter '{name}'")
        if config.use_dora or config.is_pissa:
            raise ConfigError(f"{where}: DoRA and PiSSA are implemented for linear layers only, not embeddings")
        r, base = config.r, self.base_layer
        dtype, device = adapter_dtype(base), _device(base)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, config.lora_alpha, config.scaling
        A = torch.zeros(r, self.num_embeddings, device=device, dtype=dtype)
        B = torch.empty(self.embedding_dim, r, device=device, dtype=dtype)
        if device.type != "meta":
            nn.init.normal_(B)
            if config.init_lora_weights is False:
                nn.init.normal_(A)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def merge_term(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].detach(), self.lora_embedding_B[name].detach()
        return (self.scaling[name] * (B @ A).T).to(w0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        base, out_dtype = self.base_layer, result.dtype
        for a in self._pending():
            after_A = F.embedding(x, self.lora_embedding_A[a].T, base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)
            result = result + (after_A @ self.lora_embedding_B[a].T) * self.scaling[a]
        return result.to(out_dtype)  # float32 adapters on a bf16 table: hidden states stay bf16


# --- modules_to_save --------------------------------------------------------------------------
class ModulesToSave(nn.Module):
    """A trainable copy per adapter of a whole module (lm_head, embed_tokens); the original stays frozen.

    The active adapter's copy runs; with adapters disabled, or for an adapter without a copy, the
    original does. HF PEFT saves the copy under the module's own name (`lm_head.weight`).
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_
        if self.active_adapter is None:
            self.active_adapter = name

    @property
    def module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
