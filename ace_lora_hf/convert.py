"""0.1's path of the converter (`python -m ace_lora_hf.convert`); it lives in `ace_lora_hf.sources.convert`."""

from .sources.convert import *  # noqa: F403
from .sources.convert import __all__, cli


if __name__ == "__main__":
    cli()
