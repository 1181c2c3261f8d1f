"""Errors a user can cause: each message is one line that names the input (file, row, column, tensor, field) and
the fix. Command lines print them without a traceback (`ace_lora_hf.cli.run_cli`); any other exception is a bug.

This file has no imports so that it travels with the model code to the Hub (remote code).
"""


class AceLoraError(Exception):
    """Base class of every error caused by an input rather than by a bug in this package."""


class ConfigError(AceLoraError, ValueError):
    """A configuration field out of its range or inconsistent with another field."""


class CheckpointError(AceLoraError, ValueError):
    """A weights file or model folder that cannot be used: wrong format, truncated, wrong keys, non-finite values."""


class AdapterMismatchError(CheckpointError):
    """Adapters whose structure (rank, top-k, towers, shapes) does not fit the model they are loaded into."""


class ModelSourceError(AceLoraError):
    """A model, tokenizer or adapter source that cannot be found, downloaded or used as given."""


class ImageLoadError(AceLoraError, ValueError):
    """An image that cannot be read or used."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class DataFormatError(AceLoraError, ValueError):
    """A table (or one of its rows or columns) that does not have the expected layout or values."""


class InvalidArgumentError(AceLoraError, ValueError):
    """An argument of a public function or command line outside what it accepts."""


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
