#!/usr/bin/env python
"""Fine-tune and evaluate the ACE-LoRA segmentation head (SIIM pneumothorax) on the frozen encoder with Accelerate.

    accelerate launch examples/finetune_segmentation.py --model ace-lora/ --data_root SIIM/ --output_dir runs/seg \\
        --fraction 0.01

The epoch with the best Dice over the pneumothorax-positive validation images is kept (best/) and reported on the test
split (test_results.json: Dice over the positive images and pooled Dice). See ace_lora_hf.training.finetuning for the
protocol and ace_lora_hf.training.loop for the outputs and resuming; every option can also come from --config
FILE.yaml.
"""

from ace_lora_hf.cli.common import run_cli
from ace_lora_hf.training.finetuning import SEGMENTATION, finetuning_parser, run_finetuning


def main(argv=None) -> None:
    run_finetuning(SEGMENTATION, finetuning_parser(SEGMENTATION, __doc__).parse(argv))


if __name__ == "__main__":
    run_cli(main)
