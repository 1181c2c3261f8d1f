"""The Hugging Face Space: the ACE-LoRA browser demo (`ace_lora_hf.app`) as Spaces run it, `python app.py`.

The model comes from the environment variable ACE_LORA_MODEL (a Hub id or a folder; default aydnarda/ACE-LoRA).
"""

import os

from ace_lora_hf.app import DEFAULT_MODEL, build_demo, load_model


demo = build_demo(*load_model(os.environ.get("ACE_LORA_MODEL", DEFAULT_MODEL)))

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME and GRADIO_SERVER_PORT; run locally, this serves http://127.0.0.1:7860.
    demo.launch()
