"""Whether calling a module would run hooks: the fused paths (LoRA groups, the fused loss) bypass
module calls, so they step aside wherever a hook is registered that they would skip."""
from __future__ import annotations

import torch.nn as nn


def has_module_hooks(m: nn.Module) -> bool:
    """Whether calling `m` runs its own hooks (forward, forward-pre, backward, backward-pre)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether hooks registered for every module (`register_module_forward_hook`, ...) are set."""
    from torch.nn.modules import module as M

    return any(getattr(M, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))
