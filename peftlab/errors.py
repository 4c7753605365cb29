"""One exception family for everything a user can get wrong.

Every error a user can cause (a malformed record, an unknown config key, a checkpoint that does
not fit the model, a truncated file, an unsupported dtype) is a `PeftlabError` whose message names
the file, the record and the field involved. Catch `PeftlabError` to catch them all.
"""


class PeftlabError(Exception):
    """Base class of every error peftlab raises on bad input."""


class ConfigError(PeftlabError):
    """A configuration (YAML, JSON, dataclass keyword) is invalid."""


class CheckpointError(PeftlabError):
    """A model or training checkpoint is missing, corrupt, or does not fit the model."""


class DataError(PeftlabError):
    """A dataset record is malformed."""


class AdapterError(PeftlabError):
    """An adapter does not fit the base model, or its files are malformed."""


class QuantError(PeftlabError):
    """A tensor cannot be quantized or dequantized as asked (shape, dtype, blocksize, state)."""


class TrainingError(PeftlabError):
    """A training run cannot go on (non-finite loss, inconsistent resume)."""
