"""0.1's import path; the module lives in `ace_lora_hf.models.ace_lora.image_loading`."""

from .models.ace_lora.image_loading import *  # noqa: F403
from .models.ace_lora.image_loading import __all__  # noqa: F401
