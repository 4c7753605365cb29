"""Trainer, schedules, checkpoints, evaluation (see trainer.py)."""
from .config import DataConfig, TrainConfig, load_train_config
from .trainer import RunResult, train

__all__ = ["DataConfig", "TrainConfig", "load_train_config", "RunResult", "train"]
