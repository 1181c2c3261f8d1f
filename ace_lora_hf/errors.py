"""Errors a user can cause: each message is one line that names the input (file, row, column, tensor, field) and
the fix. Command lines print them without a traceback (`ace_lora_hf.cli.common.run_cli`); any other exception is a bug.
The model code's own errors live beside it (they travel to the Hub with it) and are the base of these.
"""

from .models.ace_lora.errors import AceLoraError, CheckpointError, ConfigError, ImageLoadError, InvalidArgumentError


class AdapterMismatchError(CheckpointError):
    """Adapters whose structure (rank, top-k, towers, shapes) does not fit the model they are loaded into."""


class ModelSourceError(AceLoraError):
    """A model, tokenizer or adapter source that cannot be found, downloaded or used as given."""


class DataFormatError(AceLoraError, ValueError):
    """A table (or one of its rows or columns) that does not have the expected layout or values."""


class MissingDependencyError(AceLoraError, ImportError):
    """An optional feature whose packages are not installed; the message names the extra that installs them."""


class OutputPathError(AceLoraError):
    """An output path that would replace an input, is the wrong kind of file, or exists without `--overwrite`."""


class FolderInUseError(OutputPathError):
    """An output folder that another running job holds."""


class TrainingDivergedError(AceLoraError):
    """Training produced a non-finite loss or weights; nothing non-finite is saved."""


__all__ = [
    "AceLoraError",
    "AdapterMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataFormatError",
    "FolderInUseError",
    "ImageLoadError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "ModelSourceError",
    "OutputPathError",
    "TrainingDivergedError",
]
