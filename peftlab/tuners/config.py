"""All PEFT configs in one import. Each class lives beside the method it configures."""
from .lora import LoraConfig  # noqa: F401
from .prompt import PromptTuningConfig, PTuningConfig  # noqa: F401
from .prefix import PrefixTuningConfig  # noqa: F401
from .freeze import BitFitConfig, FreezeConfig  # noqa: F401

__all__ = ["LoraConfig", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "FreezeConfig", "BitFitConfig"]
