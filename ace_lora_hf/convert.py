"""0.1's path of the converter: `python -m ace_lora_hf.convert` runs `ace-lora-convert` (`ace_lora_hf.cli.convert`);
its library functions live in `ace_lora_hf.sources.convert`."""

from .cli.convert import cli, main
from .sources.convert import *  # noqa: F403
from .sources.convert import __all__ as _library


__all__ = [*_library, "cli", "main"]


if __name__ == "__main__":
    cli()
