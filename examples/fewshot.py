#!/usr/bin/env python
"""Few-shot adaptation of ACE-LoRA (zero-shot, linear probe, prompt-initialised head with LoRA; K shots per class,
several seeds); the same command is installed as `ace-lora-fewshot`.

    python examples/fewshot.py --train-table train.csv --test-table test.csv --shots 1 2 4 8 16 --output fewshot/
"""

from ace_lora_hf.cli.fewshot import cli


if __name__ == "__main__":
    cli()
