"""0.1's import path; the module lives in `ace_lora_hf.sources.adapters`."""

from .sources.adapters import *  # noqa: F403
from .sources.adapters import __all__  # noqa: F401
