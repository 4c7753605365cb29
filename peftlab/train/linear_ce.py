"""Fused output head + cross-entropy: the causal-LM loss without the [N, vocab] logits tensor.

For N rows of final hidden states H [N, d], the head W [V, d] (bias b [V] optional) and labels
y [N], the training loss of a causal LM is

    z_i = W h_i + b                                   logits of row i            [V]
    L   = Σ_{i: y_i ≠ ignore} ( logsumexp(z_i) - z_{i, y_i} )                      scalar

The unfused path writes all N·V logits, their log-softmax, and in backward an N·V gradient (and
on the way a shifted copy of the logits): four passes over 16 MB for a batch of 2048 tokens with
a 2048-token vocabulary, each freshly allocated. Here the rows run in chunks of C rows, small
enough that the C × V block stays in cache (C·V ≈ 2^19 floats on the CPU, 2^25 on CUDA where the
point is memory), and the gradient is finished inside the forward, while the block is at hand.
The idea is that of Liger Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv 2410.10989)
and of Cut Cross-Entropy (Wijmans et al. 2024, arXiv 2411.09009), written here in plain PyTorch.

Gradient. With p_i = softmax(z_i) and e_y the one-hot vector of y,

    ∂/∂z_{ik} [logsumexp(z_i) - z_{i,y_i}] = exp(z_ik) / Σ_j exp(z_ij) - [k = y_i] = p_ik - [k = y_i]

so the logits gradient is G = P - E_y [N, V] (a zero row where y_i = ignore), and by the chain
rule through z = H Wᵀ + 1 bᵀ:

    ∂L/∂H = G W  [N, d]        ∂L/∂W = Gᵀ H  [V, d]        ∂L/∂b = Gᵀ 1 = Σ_i G_i  [V]

All three are linear in G, so chunk c contributes G_c W to its own rows of ∂L/∂H and Gᵀ_c H_c to
sums over chunks for ∂L/∂W and ∂L/∂b. Forward computes them (only those whose input needs a
gradient: a frozen head costs no Gᵀ H GEMM); backward receives the scalar g = ∂(outer)/∂L and
returns g·∂L/∂H, g·∂L/∂W, g·∂L/∂b. In no_grad / inference only the loss is computed.

Ignored rows are dropped before the chunks (index_select; autograd scatters ∂L/∂H back with zeros
in their rows), so the masked prompt and padding tokens of supervised fine-tuning cost nothing.

Dtypes follow the unfused `token_loss_sum(F.linear(h, W, b), y)`: the logits come out of the GEMM
in the compute dtype (the autocast dtype when autocast is on for the device, else the common dtype
of H and W) and are upcast to at least float32 for the softmax (float64 stays float64); G is cast
back to the compute dtype for the two GEMMs, as the autograd of `.float()` does; the gradients
come back in each input's dtype (∂L/∂W and ∂L/∂b are summed over chunks in float32 or wider).

`causal_lm_loss_sum(model, ids, labels)` applies this to a peftlab causal LM: it asks the model for
its final hidden states (`return_hidden=True`) and takes the head's weight itself when
`output_head(model)` allows it, otherwise it computes the logits and `token_loss_sum` as before.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import DataError
from ..modhooks import global_module_hooks, has_module_hooks

CPU_CHUNK_ELEMENTS = 1 << 19   # C·V floats per chunk on the CPU: 2 MB of float32, about one L2
CUDA_CHUNK_ELEMENTS = 1 << 25  # 128 MB of float32: large GEMMs, memory bounded regardless of N


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, budget // max(vocab, 1))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` runs its GEMM in: the autocast dtype when autocast is on
    for the device (and the inputs are autocast-eligible: floating point, not float64), else the
    inputs' own dtype, which must then be the same for both."""
    dev = hidden.device.type
    eligible = all(t.is_floating_point() and t.dtype != torch.float64 for t in (hidden, weight))
    if eligible and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype} (outside "
                         "autocast F.linear needs one dtype)")
    return hidden.dtype


def _chunked(hidden, weight, bias, labels, rows, cdt, want_h, want_w, want_b):
    """Loss sum over all rows of `hidden` (every label valid) and, as asked, the unscaled gradients."""
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    ld = torch.promote_types(cdt, torch.float32)   # logits / softmax dtype
    acc = ld                                       # ∂L/∂W, ∂L/∂b accumulators
    W = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    R = max(1, min(rows, N))
    z = torch.empty(R, V, dtype=cdt, device=dev)              # GEMM output
    zf = z if cdt == ld else torch.empty(R, V, dtype=ld, device=dev)  # softmax, then G
    gq = zf if cdt == ld else z                               # G in the compute dtype (reuses z)
    loss = torch.zeros((), dtype=ld, device=dev)
    grad_h = torch.empty(N, d, dtype=hidden.dtype, device=dev) if want_h else None
    hbuf = torch.empty(R, d, dtype=cdt, device=dev) if want_h and hidden.dtype != cdt else None
    grad_w = torch.zeros(V, d, dtype=acc, device=dev) if want_w else None
    wbuf = torch.empty(V, d, dtype=cdt, device=dev) if want_w and cdt != acc else None
    grad_b = torch.zeros(V, dtype=acc, device=dev) if want_b else None
    for s in range(0, N, R):
        e = min(s + R, N)
        r = e - s
        h = hidden[s:e].to(cdt)
        zc, zfc = z[:r], zf[:r]
        if b is None:
            torch.mm(h, W.t(), out=zc)
        else:
            torch.addmm(b, h, W.t(), out=zc)
        if zfc is not zc:
            zfc.copy_(zc)
        y = labels[s:e, None]
        target = zfc.gather(1, y).squeeze(1)
        top = zfc.amax(1, keepdim=True)
        zfc.sub_(top).exp_()                  # exp(z - max), in place
        total = zfc.sum(1, keepdim=True)
        loss += (top.squeeze(1) + total.squeeze(1).log() - target).sum()  # Σ logsumexp(z) - z_y
        if not (want_h or want_w or want_b):
            continue
        zfc.div_(total)                        # P
        zfc.scatter_add_(1, y, zfc.new_full((r, 1), -1.0))  # G = P - E_y
        g = gq[:r]
        if g is not zfc:
            g.copy_(zfc)
        if want_h:
            if hbuf is None:
                torch.mm(g, W, out=grad_h[s:e])
            else:
                torch.mm(g, W, out=hbuf[:r])
                grad_h[s:e].copy_(hbuf[:r])
        if want_w:
            if wbuf is None:
                grad_w.addmm_(g.t(), h)
            else:
                grad_w.add_(torch.mm(g.t(), h, out=wbuf))
        if want_b:
            grad_b.add_(g.sum(0, dtype=acc))
    return loss, grad_h, grad_w, grad_b


class LinearCrossEntropyFn(torch.autograd.Function):
    """loss = Σ_i CE(h_i Wᵀ + b, y_i) over rows with valid labels; see the module docstring for the
    gradient, which forward computes and backward scales by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int, cdt: torch.dtype):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, gh, gw, gb = _chunked(hidden, weight, bias, labels, rows, cdt, want_h, want_w, want_b)
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same graph; its gradients are "
                               "made in forward and handed over once (do not use retain_graph here)")
        grads, ctx.grads = ctx.grads, None     # hand the tensors over: autograd may keep them as .grad
        out = []
        for t, dtype in zip(grads, ctx.dtypes):
            if t is not None:
                t = t.mul_(g) if t.dtype in (torch.float32, torch.float64) else t.float().mul_(g)
            out.append(None if t is None else t.to(dtype))
        return out[0], out[1], out[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """(Σ cross-entropy of hidden Wᵀ + b against labels over rows whose label is not ignore_index,
    number of such rows), without materialising the [N, V] logits.

    hidden [N, d], weight [V, d], labels [N] (integer), bias [V] or None. The loss is a 0-dim
    float32 tensor (float64 for float64 inputs) carrying gradients to hidden, weight and bias as
    far as they require them; equal to `F.cross_entropy(F.linear(hidden, weight, bias).float(),
    labels, ignore_index=ignore_index, reduction="sum")` up to summation order. chunk_rows: rows
    per chunk (default: `default_chunk_rows(V, device)`).
    """
    if hidden.dim() != 2:
        raise ValueError(f"linear_cross_entropy: hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, d={hidden.shape[1]}], got shape "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"linear_cross_entropy: bias must be [V={V}], got shape {tuple(bias.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: labels must be [N={hidden.shape[0]}], got shape "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    cdt = compute_dtype(hidden, weight)
    labels = labels.to(device=hidden.device, dtype=torch.long)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    n, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()  # one device sync
    if n_bad:
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"linear_cross_entropy: labels[{i}] = {int(labels[i])} is outside the vocabulary "
                        f"[0, {V}) and is not ignore_index={ignore_index}")
    if n < labels.shape[0]:  # drop ignored rows; autograd puts zeros back into their ∂L/∂h rows
        keep = valid.nonzero().squeeze(1)
        hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)
    rows = chunk_rows or default_chunk_rows(V, hidden.device)
    tensors = (hidden, weight) + (() if bias is None else (bias,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return LinearCrossEntropyFn.apply(hidden, weight, bias, labels, rows, cdt), n
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        loss = _chunked(hidden, weight, bias, labels, rows, cdt, False, False, False)[0]
    return loss, n


# --- a peftlab causal LM -------------------------------------------------------------------------
def _is_fsdp(m: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(m, FSDPModule)


def output_head(model: nn.Module) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) of `model`'s output head if `causal_lm_loss_sum` may apply it itself, else None.

    The head is used directly only when all of these hold, and the logits path is taken otherwise:
      1. `model` is peftlab's LlamaForCausalLM (plain, LoRA, freeze/BitFit, QLoRA) or one inside a
         chain of DDP (`.module`) and prompt-tuning / P-tuning / prefix wrappers (`.base_model`);
      2. nothing in that chain is FSDP-sharded (an FSDP module, or a head weight that is a DTensor);
      3. its `lm_head` is exactly an nn.Linear, or a modules_to_save wrapper whose active module is
         exactly an nn.Linear: a LoRA layer on the head, a 4-bit or dequantized head, or any other
         subclass falls back, since its forward is not just h Wᵀ + b;
      4. no module hooks that the fused path would skip or feed differently: none on the head or
         its modules_to_save wrapper (the head module is never called), none on the models of the
         chain (they would see hidden states instead of logits), no global module hooks;
      5. under DDP the head is frozen (DDP reduces the gradients of parameters used in its forward).
    """
    from torch.nn.parallel import DistributedDataParallel

    from ..models.llama import LlamaForCausalLM
    from ..tuners.lora_layers import ModulesToSave
    from ..tuners.prompt import VirtualTokenModel

    if global_module_hooks():
        return None
    ddp = False
    m = model
    while not isinstance(m, LlamaForCausalLM):
        if _is_fsdp(m) or has_module_hooks(m):
            return None
        if isinstance(m, DistributedDataParallel):
            ddp, m = True, m.module
        elif isinstance(m, VirtualTokenModel):
            m = m.base_model
        else:
            return None
    head = getattr(m, "lm_head", None)
    if _is_fsdp(m) or has_module_hooks(m) or head is None:
        return None
    if isinstance(head, ModulesToSave):
        if has_module_hooks(head):
            return None
        head = head.module
    if type(head) is not nn.Linear or has_module_hooks(head):
        return None
    params = [p for p in (head.weight, head.bias) if p is not None]
    if any(hasattr(p, "to_local") for p in params):
        return None
    if ddp and any(p.requires_grad for p in params):
        return None
    return head.weight, head.bias


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """(Σ next-token cross-entropy over positions whose label is not -100, their count): the value
    of `token_loss_sum(model(input_ids), labels)`, by `linear_cross_entropy` on the final hidden
    states when `output_head(model)` gives the head, else by exactly that logits path."""
    head = output_head(model)
    if head is None:
        from .evaluate import token_loss_sum

        return token_loss_sum(model(input_ids), labels)
    weight, bias = head
    hidden = model(input_ids, return_hidden=True)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape) or hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"causal_lm_loss_sum: hidden states {tuple(hidden.shape)} do not fit labels "
                         f"{tuple(labels.shape)} and head weight {tuple(weight.shape)}")
    # position t predicts label t + 1; the last position predicts nothing (-100), as HF pads it
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1), bias,
                                chunk_rows=chunk_rows)
