"""Linear4bit: a frozen 4-bit weight with an optional bias, the base layer of QLoRA.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3, eq. 5) computes a linear layer from a
4-bit NF4 weight by dequantizing it to the 16-bit compute dtype on the fly::

    Y = X · doubleDequant(c1, c2, W_NF4)^T + b          X [..., in], W [out, in], Y [..., out]

The weight is stored as the packed uint8 buffer ``weight`` ([(out*in + 1) // 2, 1], as in
bitsandbytes) plus ``quant_state`` (``state.py``); it is frozen: no gradient ever reaches it.
Only the bias (if any, and if it requires grad) and the input receive gradients, which is what
lets LoRA adapters on top train through it.

Gradient of the custom autograd Function (``_Dequant4bitLinear``). With ``W = dequant(packed)``
held constant and ``y = x W^T + b`` (summing over the batch dims of ``x``)::

    y_k = sum_j x_j W_kj + b_k
    dL/dx_j = sum_k dL/dy_k * dy_k/dx_j = sum_k g_k W_kj       ->  grad_x = g @ W      [..., in]
    dL/db_k = sum over batch of g_k                            ->  grad_b = g.sum(batch dims)
    dL/dW   = none (frozen, stored in 4 bits)

Forward saves only the packed weight and its state, never the dequantized ``W`` (that would
cost 16 bits per parameter of activation memory); backward dequantizes again.

Dispatch (``_matmul``, the single hook): on CUDA, for at most ``FUSED_MAX_ROWS`` rows (decode,
small batches), the fused 4-bit matmul of ``peftlab.kernels.matmul4bit`` (weights decoded inside
the kernel, fused backward); float32 inputs only under CUDA autocast or where PyTorch allows TF32
(``torch.get_float32_matmul_precision() != "highest"``), since that kernel's float32 dot is TF32.
Everywhere else (CPU, more rows, strict float32) the autograd Function below: dequantize, then
``F.linear``.

State dicts use bitsandbytes' key names (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
``bias``), so a bitsandbytes ``Linear4bit`` state dict loads here and the other way round.
``module.to(device)`` moves the quant state with the weight; dtype casts (``.half()``,
``.to(torch.bfloat16)``) touch only the bias: the state stays float32 / uint8.

Quant storage (for FSDP). FSDP shards parameters only, never buffers, so ``set_quant_storage(
torch.bfloat16)`` re-registers the same packed bytes as a frozen ``nn.Parameter`` whose dtype is
bfloat16 (or float32 ...): [(n+1)//2 / itemsize, 1], bitsandbytes' ``quant_storage``. The bytes are
never converted: forward and ``dequantize`` reinterpret them as uint8 (``packed_weight()``), dtype
casts leave them alone, and the state dict stores them under ``weight`` in the storage dtype
(which bitsandbytes and ``load_weight_state_dict`` read back as bytes). The quant state (absmax,
code tables) stays a plain per-rank copy: 1/32 of the packed bytes with double quantization
(one uint8 absmax per 64 weights), 1/8 without.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantError
from .functional import dequantize_4bit, quantize_4bit, quantize_4bit_reference
from .state import QuantState, load_weight_state_dict, quant_state_keys, weight_state_dict


class _Dequant4bitLinear(torch.autograd.Function):
    """``y = x · dequant(packed)^T + b``; backward: ``grad_x = g @ W``, ``grad_b = sum g``."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        w = dequantize_4bit(packed, state, out_dtype=x.dtype)
        ctx.save_for_backward(packed)
        ctx.state = state
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(packed, ctx.state, out_dtype=grad_out.dtype)
            grad_x = grad_out @ w
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_b


# Up to this many rows (tokens) the fused kernel (dequantization inside the matmul) runs on CUDA;
# above it, dequantize-then-cuBLAS wins (see experiments/results/bench_kernels.csv).
FUSED_MAX_ROWS = 128


def _use_fused(x: torch.Tensor) -> bool:
    """The fused kernel for CUDA inputs of at most FUSED_MAX_ROWS rows. Its float32 dot runs in
    TF32 (10-bit mantissa), so float32 inputs take it only where PyTorch's own float32 matmuls
    would be as coarse: ``torch.set_float32_matmul_precision`` below "highest" (TF32 allowed),
    or under CUDA autocast (which runs F.linear in 16 bits). Otherwise a float32 layer would silently be less precise
    for small batches than for large ones."""
    if not x.is_cuda or x.numel() // max(x.shape[-1], 1) > FUSED_MAX_ROWS:
        return False
    return (x.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
            or torch.is_autocast_enabled("cuda"))


def _matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dequant(packed)^T + bias``: the fused Triton kernel where ``_use_fused`` says so
    (peftlab.kernels.matmul4bit, whose backward is fused too); elsewhere dequantize then
    F.linear, recomputing the dequantization in backward."""
    if _use_fused(x):
        from ..kernels.matmul4bit import matmul_4bit

        return matmul_4bit(x, packed, state, bias)
    return _Dequant4bitLinear.apply(x, packed, state, bias)


class Linear4bit(nn.Module):
    """A 4-bit frozen linear layer (see the module docstring).

    Constructors: ``Linear4bit(in_features, out_features)`` holds an all-zero weight until a
    state dict is loaded; ``from_linear(linear)`` / ``from_weight(weight, bias)`` quantize a
    float weight [out, in] (on its device: Triton on CUDA); ``from_bnb_state_dict(sd)`` wraps an
    already-quantized bitsandbytes weight. ``compute_dtype`` (default: the input's dtype) is the
    dtype of the dequantized weight and of the matmul; the output is cast back to the input's
    dtype, as bitsandbytes does. The bias is frozen unless ``bias_trainable``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, device=None,
                 dtype: torch.dtype = torch.float32, bias_trainable: bool = False):
        super().__init__()
        zeros = torch.zeros(int(out_features), int(in_features), dtype=dtype, device=device)
        packed, state = quantize_4bit_reference(zeros, blocksize, quant_type, double_quant)
        b = torch.zeros(int(out_features), dtype=dtype, device=device) if bias else None
        self._setup(packed, state, b, compute_dtype, bias_trainable)

    def _setup(self, packed, state, bias, compute_dtype, bias_trainable) -> None:
        self.out_features, self.in_features = (int(s) for s in state.shape)
        self.compute_dtype = compute_dtype
        self._store_packed(packed, torch.uint8)
        self._quant_state = state
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias_trainable)

    @classmethod
    def _wrap(cls, packed, state, bias, compute_dtype, bias_trainable) -> "Linear4bit":
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._setup(packed, state, bias, compute_dtype, bias_trainable)
        return mod

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, nested_rounding: str = "nearest",
                    bias_trainable: bool = False) -> "Linear4bit":
        """Quantize a float ``weight`` [out, in] (and keep ``bias`` [out], frozen by default)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise QuantError(f"Linear4bit.from_weight: weight must be a 2-D tensor [out, in], got "
                             f"{tuple(getattr(weight, 'shape', ())) or type(weight).__name__}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise QuantError(f"Linear4bit.from_weight: bias has shape {tuple(bias.shape)}, "
                             f"expected ({weight.shape[0]},)")
        packed, state = quantize_4bit(weight.detach(), blocksize, quant_type, double_quant,
                                      nested_rounding)
        return cls._wrap(packed, state, bias, compute_dtype, bias_trainable)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                    nested_rounding: str = "nearest", bias_trainable: bool = False,
                    ) -> "Linear4bit":
        """Quantize ``linear.weight``; the bias is copied (frozen unless ``bias_trainable``)."""
        if not isinstance(linear, nn.Linear):
            raise QuantError(f"Linear4bit.from_linear: expected nn.Linear, got "
                             f"{type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, quant_type, blocksize, double_quant,
                               compute_dtype, nested_rounding, bias_trainable)

    @classmethod
    def from_bnb_state_dict(cls, state_dict, in_features: Optional[int] = None,
                            out_features: Optional[int] = None,
                            compute_dtype: Optional[torch.dtype] = None, device=None,
                            source: str = "state dict", prefix: str = "",
                            bias_trainable: bool = False) -> "Linear4bit":
        """Wrap a bitsandbytes-quantized weight: ``{prefix}weight``, ``{prefix}weight.absmax``,
        ... (and ``{prefix}bias`` if present). Errors name ``source`` and the key."""
        packed, state = load_weight_state_dict(state_dict, prefix, device, source)
        expected = (out_features if out_features is not None else state.shape[0],
                    in_features if in_features is not None else state.shape[-1])
        if len(state.shape) != 2 or tuple(state.shape) != expected:
            raise QuantError(f"{source}: '{prefix}weight' has shape {tuple(state.shape)}, "
                             f"expected {expected}")
        bias = state_dict.get(prefix + "bias")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (expected[0],) \
                    or not bias.is_floating_point():
                got = (f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor)
                       else type(bias).__name__)
                raise QuantError(f"{source}: '{prefix}bias' is {got}, expected a float tensor of "
                                 f"shape ({expected[0]},)")
            bias = bias.to(device)
        return cls._wrap(packed, state, bias, compute_dtype, bias_trainable)

    @property
    def quant_state(self) -> QuantState:
        return self._quant_state

    @property
    def quant_storage(self) -> torch.dtype:
        """dtype the packed bytes are stored as: uint8 (a buffer) or a float type (a parameter)."""
        return self.weight.dtype

    def packed_weight(self) -> torch.Tensor:
        """The packed bytes as uint8 [(n+1)//2, 1], whatever the storage dtype (a view, no copy)."""
        w = self.weight
        return w if w.dtype == torch.uint8 else w.reshape(-1).view(torch.uint8).reshape(-1, 1)

    def set_quant_storage(self, dtype: torch.dtype) -> "Linear4bit":
        """Store the packed bytes as ``dtype``: uint8 (a buffer, the default) or a float type (a
        frozen parameter that FSDP can shard); the bytes themselves are unchanged."""
        self._store_packed(self.packed_weight(), dtype)
        return self

    def _store_packed(self, packed: torch.Tensor, storage: torch.dtype) -> None:
        self._buffers.pop("weight", None)
        self._parameters.pop("weight", None)
        if storage == torch.uint8:
            self.register_buffer("weight", packed, persistent=False)
            return
        size = torch.empty((), dtype=storage).element_size()
        if not storage.is_floating_point or packed.numel() % size:
            raise QuantError(f"Linear4bit [{self.out_features}, {self.in_features}]: cannot store "
                             f"{packed.numel()} packed bytes as {storage} (needs a float dtype whose "
                             f"size divides the byte count)")
        stored = packed.reshape(-1).view(storage).reshape(-1, 1)
        others = dict(self._parameters)  # keep 'weight' first, as in nn.Linear
        self._parameters.clear()
        self._parameters["weight"] = nn.Parameter(stored, requires_grad=False)
        self._parameters.update(others)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full-precision weight [out, in] (``dtype`` default: the quantized weight's dtype)."""
        return dequantize_4bit(self.packed_weight(), self._quant_state, out_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(cdt)
        return _matmul(x.to(cdt), self.packed_weight(), self._quant_state, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        stored = self._parameters.pop("weight", None)
        if stored is None:
            super()._apply(fn, recurse)
        else:  # float storage: move the bytes as uint8, so that a dtype cast cannot touch them
            try:
                super()._apply(fn, recurse)
            finally:
                self._parameters["weight"] = stored
            moved = fn(self.packed_weight().detach())
            self._store_packed(moved, stored.dtype)
        if self._quant_state.device != self.weight.device:
            self._quant_state = self._quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in weight_state_dict(self.weight, self._quant_state, prefix).items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        ours = set(quant_state_keys(state_dict, prefix)) | {wkey}
        if wkey in state_dict:
            what = f"Linear4bit '{prefix[:-1] or '<root>'}'"
            packed, state = load_weight_state_dict(state_dict, prefix, self.weight.device, what)
            if tuple(state.shape) != (self.out_features, self.in_features):
                raise QuantError(f"{what}: '{wkey}' has shape {tuple(state.shape)}, the module "
                                 f"expects {(self.out_features, self.in_features)}")
            self._store_packed(packed, self.quant_storage)
            self._quant_state = state
        else:
            missing_keys.append(wkey)
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        stored = self._parameters.pop("weight", None)  # float storage: loaded above, not here
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            if stored is not None:
                self._parameters["weight"] = stored

    def extra_repr(self) -> str:
        s = self._quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={s.quant_type}, "
                f"blocksize={s.blocksize}, double_quant={s.nested}, "
                f"compute_dtype={self.compute_dtype}"
                + ("" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}"))
