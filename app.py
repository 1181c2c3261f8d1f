"""The Hugging Face Space: the ACE-LoRA browser demo (`ace-lora-app`) as Spaces run it, `python app.py`.

The model comes from the environment variable ACE_LORA_MODEL (anything `ace-lora-app --model` takes: a model folder,
Hub repository, training run or checkpoint); without it, the released model is built once from BiomedCLIP and the
authors' adapters.
"""

import os

from ace_lora_hf.cli.app import load_demo_model, parse_args
from ace_lora_hf.inference.demo import build_demo


model_options = ["--model", os.environ["ACE_LORA_MODEL"]] if os.environ.get("ACE_LORA_MODEL") else []
model, processor, _ = load_demo_model(parse_args(model_options))
demo = build_demo(model, processor)

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME and GRADIO_SERVER_PORT; run locally, this serves http://127.0.0.1:7860.
    demo.launch()
