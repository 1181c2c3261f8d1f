#!/usr/bin/env python
"""Fine-tune and evaluate the ACE-LoRA detection head (RSNA pneumonia) on the frozen encoder with Accelerate.

    accelerate launch examples/finetune_detection.py --model ace-lora/ --data_root RSNA/ --output_dir runs/det \\
        --fraction 0.01

The epoch with the best validation mAP (the RSNA challenge's, IoU 0.4 to 0.75) is kept (best/) and reported on the
test split (test_results.json). See ace_lora_hf.training.finetuning for the protocol and ace_lora_hf.training.loop
for the outputs and resuming; every option can also come from --config FILE.yaml.
"""

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.training.finetuning import DETECTION, finetuning_parser, run_finetuning


def main(argv=None) -> None:
    run_finetuning(DETECTION, finetuning_parser(DETECTION, __doc__).parse(argv))


if __name__ == "__main__":
    run_cli(main)
