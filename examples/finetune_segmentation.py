#!/usr/bin/env python
"""Fine-tune and evaluate the ACE-LoRA segmentation head with Accelerate (frozen encoder; see ace_lora_hf.finetuning).

    accelerate launch examples/finetune_segmentation.py --model ace-lora/ --data-root DATA/ --output_dir runs/segmentation \\
        --fraction 0.01
"""

from ace_lora_hf.finetuning import run


if __name__ == "__main__":
    run("segmentation")
