"""0.1's import path; the module lives in `ace_lora_hf.models.ace_lora.zero_shot`."""

from .models.ace_lora.zero_shot import *  # noqa: F403
from .models.ace_lora.zero_shot import __all__  # noqa: F401
