"""What a finished run leaves behind: an adapter in PEFT format, or a full HF checkpoint."""
from __future__ import annotations

from pathlib import Path

from .config import DTYPES, TrainConfig


def export_final(res, cfg: TrainConfig) -> Path:
    """Adapter methods write `run_dir/adapter/`; full fine-tuning and pretraining write a
    Hugging Face checkpoint to `export_dir` (default `run_dir/model/`) with the tokenizer."""
    if cfg.method == "full":
        from ..models import save_pretrained

        out = Path(cfg.export_dir) if cfg.export_dir else res.run_dir / "model"
        dtype = DTYPES.get(cfg.save_dtype or "")
        save_pretrained(res.model, out, tokenizer=res.tokenizer, dtype=dtype)
        return out
    from ..tuners.io import save_adapter

    out = Path(cfg.export_dir) if cfg.export_dir else res.run_dir / "adapter"
    base = cfg.model if cfg.model else None
    save_adapter(res.model, out, base_model_name_or_path=base)
    if cfg.export_merged:
        export_merged(out, cfg, res.run_dir)
    return out


def export_merged(adapter_dir: Path, cfg: TrainConfig, run_dir: Path) -> Path:
    """With `export_merged`, fold the exported adapter into the full-precision base:
    run_dir/merged, a Hugging Face checkpoint."""
    from ..tuners.merge import merge_to_checkpoint
    from .trainer import resolve_model_path

    return merge_to_checkpoint(resolve_model_path(cfg.model), adapter_dir, Path(run_dir) / "merged")
