"""The Hugging Face Space: the ACE-LoRA browser demo (`ace_lora_hf.cli.app`) as Spaces run it, `python app.py`.

The model comes from the environment variable ACE_LORA_MODEL (a folder or Hub repository in ACE-LoRA's format); without
it, the released model is built once from BiomedCLIP and the authors' adapters.
"""

import os

from ace_lora_hf.cli.app import build_demo, load_demo_model, parse_args


model_options = ["--model", os.environ["ACE_LORA_MODEL"]] if os.environ.get("ACE_LORA_MODEL") else []
demo = build_demo(*load_demo_model(parse_args(model_options)))

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME and GRADIO_SERVER_PORT; run locally, this serves http://127.0.0.1:7860.
    demo.launch()
