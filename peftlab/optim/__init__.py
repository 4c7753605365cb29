"""Paged AdamW (QLoRA, arXiv 2305.14314, Sec. 3): states in host memory, streamed in chunks.

    from peftlab.optim import PagedAdamW
    opt = PagedAdamW(model.parameters(), lr=2e-4, state_bits=8, gpu_budget_bytes="auto")

`optimizer_state_to_safetensors` / `optimizer_state_from_safetensors` checkpoint any
torch optimizer state dict without pickle.
"""
from .paged_adamw import PagedAdamW
from .state_io import (flatten_optimizer_state, optimizer_state_from_safetensors,
                       optimizer_state_to_safetensors, unflatten_optimizer_state)

__all__ = ["PagedAdamW", "optimizer_state_to_safetensors", "optimizer_state_from_safetensors",
           "flatten_optimizer_state", "unflatten_optimizer_state"]
