# Copyright 2026 The ACE-LoRA authors and the ace-lora-hf contributors. All rights reserved.
#
# Licensed under the MIT License (the "License"); you may not use this file except in compliance with the License.
"""The zero-shot pipeline's record in a saved model folder: `custom_pipelines` in config.json and the pipeline's code
beside the model's, so that `pipeline("zero-shot-image-classification", model=REPO, trust_remote_code=True)` serves
ACE-LoRA's pipeline where the ace-lora-hf package is not installed (without it, transformers would build its stock
pipeline, which reads no DICOM and scores with one template)."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files


TASK = "zero-shot-image-classification"
PIPELINE_FILE = Path(__file__).with_name("pipeline_ace_lora.py")
# What transformers' Pipeline.save_pretrained writes for a registered pipeline class.
CUSTOM_PIPELINES = {
    TASK: {
        "impl": f"{PIPELINE_FILE.stem}.AceLoraZeroShotImageClassificationPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    }
}
_ABSENT = object()


def pipeline_code_files() -> list[Path]:
    """The pipeline's file and every file it imports, or none where this copy of the model code travels without it
    (remote code loaded for the model alone)."""
    if not PIPELINE_FILE.is_file():
        return []
    return [PIPELINE_FILE, *map(Path, get_relative_import_files(str(PIPELINE_FILE)))]


@contextmanager
def pipeline_recorded(config, save_directory: str | Path) -> Iterator[None]:
    """While a model saves `config` into `save_directory`: `custom_pipelines` names the pipeline (only where its code
    can be copied beside); afterwards the code is copied and the config left as it was."""
    files = pipeline_code_files()
    previous = config.__dict__.get("custom_pipelines", _ABSENT)
    if files:
        config.custom_pipelines = CUSTOM_PIPELINES
    elif previous is not _ABSENT:
        del config.custom_pipelines
    try:
        yield
    finally:
        config.__dict__.pop("custom_pipelines", None)
        if previous is not _ABSENT:
            config.custom_pipelines = previous
    for file in files:
        shutil.copyfile(file, Path(save_directory) / file.name)


__all__ = ["CUSTOM_PIPELINES", "TASK", "pipeline_code_files", "pipeline_recorded"]
