"""What a finished run leaves behind: an adapter in PEFT format, or a full HF checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig


def export_final(res, cfg: TrainConfig) -> Path:
    """Adapter methods write `run_dir/adapter/`; full fine-tuning and pretraining write a
    Hugging Face checkpoint to `export_dir` (default `run_dir/model/`) with the tokenizer."""
    if cfg.method == "full":
        from ..models import save_pretrained

        out = Path(cfg.export_dir) if cfg.export_dir else res.run_dir / "model"
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(cfg.save_dtype or "")
        save_pretrained(res.model, out, tokenizer=res.tokenizer, dtype=dtype)
        return out
    from ..tuners.io import save_adapter

    out = Path(cfg.export_dir) if cfg.export_dir else res.run_dir / "adapter"
    base = cfg.model if cfg.model else None
    save_adapter(res.model, out, base_model_name_or_path=base)
    return out
