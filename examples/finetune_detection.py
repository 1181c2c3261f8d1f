#!/usr/bin/env python
"""Fine-tune and evaluate the ACE-LoRA detection head with Accelerate (frozen encoder; see ace_lora_hf.finetuning).

    accelerate launch examples/finetune_detection.py --model ace-lora/ --data-root DATA/ --output_dir runs/detection \\
        --fraction 0.01
"""

from ace_lora_hf.finetuning import run


if __name__ == "__main__":
    run("detection")
