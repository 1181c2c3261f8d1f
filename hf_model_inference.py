#!/usr/bin/env python
"""Zero-shot classification of chest X-rays (PNG/JPEG/TIFF/DICOM) with ACE-LoRA: the command line of the model card.

    python hf_model_inference.py --images examples/images/*.png examples/images/*.dcm
    python hf_model_inference.py --csv rsna_test.csv --image-root rsna/ --output results.csv

The same command is installed as `ace-lora-classify`; `--help` lists every option.
"""

from ace_lora_hf.cli.classify import cli, main


__all__ = ["main"]

if __name__ == "__main__":
    cli()
