#!/usr/bin/env python
"""Image-report retrieval with ACE-LoRA: Recall@1/5/10 and median rank, image -> report and report -> image, for the
ACE and the plain embeddings, on a prepared MIMIC-CXR-style table (image path, report).

    python dataset_prep/mimic_cxr.py --input mimic-cxr-jpg/2.1.0/ --reports mimic-cxr/ --output mimic/
    python examples/retrieval_eval.py --table mimic/mimic_cxr.csv --split test --image-root mimic-cxr-jpg/2.1.0/ \\
        --output retrieval.json

The same command is installed as `ace-lora-retrieval`; its `--help` lists the options and says
how ranks, ties and duplicate reports are counted and where embeddings are kept between runs.
"""

from ace_lora_hf.cli.retrieval import cli


if __name__ == "__main__":
    cli()
