#!/usr/bin/env python
"""Zero-shot evaluation of ACE-LoRA on the paper's benchmarks; the same command is installed as `ace-lora-evaluate`.

    python examples/zero_shot_eval.py --dataset rsna --data-root rsna-pneumonia/ --output rsna_results.json
"""

from ace_lora_hf.cli.evaluate import cli


if __name__ == "__main__":
    cli()
