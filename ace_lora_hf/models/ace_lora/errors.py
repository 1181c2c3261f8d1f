"""Errors the model code raises for a bad input: each message is one line that names the input (file, tensor, field)
and the fix. The ace-lora-hf package adds its own in `ace_lora_hf.errors` (command lines print all of them without a
traceback); any other exception is a bug.

This file has no imports so that it travels with the model code to the Hub (remote code).
"""


class AceLoraError(Exception):
    """Base class of every error caused by an input rather than by a bug in this package."""


class ConfigError(AceLoraError, ValueError):
    """A configuration field out of its range or inconsistent with another field."""


class CheckpointError(AceLoraError, ValueError):
    """A weights file or model folder that cannot be used: wrong format, truncated, wrong keys, non-finite values."""


class FormatVersionError(CheckpointError):
    """A model folder in a newer on-disk format (`ace_lora_format_version` in its config.json) than this code reads."""


class ImageLoadError(AceLoraError, ValueError):
    """An image that cannot be read or used."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class InvalidArgumentError(AceLoraError, ValueError):
    """An argument of a public function or command line outside what it accepts."""


__all__ = [
    "AceLoraError",
    "CheckpointError",
    "ConfigError",
    "FormatVersionError",
    "ImageLoadError",
    "InvalidArgumentError",
]
