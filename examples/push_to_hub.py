#!/usr/bin/env python
"""Assemble a complete Hub repository for an ACE-LoRA model and (optionally) upload it: `ace-lora-publish`.

    python examples/push_to_hub.py --model runs/ace/final --repo-id me/ace-lora-mimic --staging hub_repo/ [--push]

See `ace-lora-publish --help` (ace_lora_hf.cli.publish) for the options.
"""

from ace_lora_hf.cli.publish import cli


if __name__ == "__main__":
    cli()
