"""0.1's import path; the module lives in `ace_lora_hf.inference.explain`."""

from .inference.explain import *  # noqa: F403
from .inference.explain import __all__  # noqa: F401
