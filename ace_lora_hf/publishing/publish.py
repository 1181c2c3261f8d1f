"""Stage an ACE-LoRA model as a complete Hub repository (weights, code, processor, model card) and upload it: the
library of `ace-lora-publish` (`ace_lora_hf.cli.publish`, whose help says what each option does)."""

import json
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig
from transformers.utils import logging

from ..errors import DataFormatError, InvalidArgumentError, ModelSourceError
from ..inference.demo import DEFAULT_PRESET, EXAMPLES_FOLDER, PRESETS
from ..inference.explain import explain, plot_explanation, require_plotting
from .endpoint import add_endpoint_files
from .model_card import BIOMEDCLIP, evaluation_results, render_model_card, subgroup_rows
from ..sources.folders import model_folder
from ..sources.released_adapters import RELEASED
from ..outputs.safe_outputs import atomic_folder, check_output_folder, folder_lock
from ..sources.checkpoints import MODEL_CLASSES
from ..sources.load import load, resolve_source
from ..models.ace_lora.calibration import Calibration
from ..models.ace_lora.zero_shot import ZeroShotClassifier


logger = logging.get_logger(__name__)

INFERENCE_SCRIPT_NAME = "hf_model_inference.py"
EXPLANATION_NAME = "explanation.png"
CALIBRATION_NAME = "calibration.json"
# The card's explanation: an NIH chest X-ray shipped in examples/images (present in a source checkout).
DEFAULT_EXAMPLE_IMAGE = EXAMPLES_FOLDER / "nih_00000001_000.png"
# The command line shipped with a zero-shot model: ace-lora-classify, defaulting to the repository it sits in.
INFERENCE_SCRIPT = '''#!/usr/bin/env python
"""Zero-shot classification of chest X-rays (PNG/JPEG/TIFF/DICOM) with {repo_id}; needs the ace-lora-hf package.

    python hf_model_inference.py --images a.png b.dcm
    python hf_model_inference.py --csv test.csv --image-root images/ --output results.csv

The same command is installed with ace-lora-hf as `ace-lora-classify --model {repo_id}`; `--help` lists every option.
"""

import sys

from ace_lora_hf.cli.classify import main
from ace_lora_hf.cli.common import run_cli


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not any(argument == "--model" or argument.startswith("--model=") for argument in arguments):
        arguments = ["--model", "{repo_id}", *arguments]
    run_cli(main, arguments)
'''


def read_results(path: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise DataFormatError(f"--results {path}: cannot read it ({error.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"--results {path}: not a JSON file ({error}).") from None
    if not isinstance(results, dict):
        raise DataFormatError(f"--results {path}: expected a JSON object of results.")
    return results


def load_publishable(source: str | Path | None, revision: str | None = None, **released: str):
    """`(model, processor)` of `source` (anything `ace_lora_hf.load` takes; `released` are the released model's
    sources) as the class it was saved as (the zero-shot model or a head), LoRA kept apart from the base weights."""
    resolved = resolve_source(source)
    model_class = None  # a checkpoint names its own
    if resolved.kind != "checkpoint":
        folder = model_folder(resolved.location, revision=revision, **released)
        architectures = AutoConfig.from_pretrained(folder).architectures or ["AceLoraModel"]
        model_class = MODEL_CLASSES.get(architectures[0], MODEL_CLASSES["AceLoraModel"])
    model, processor, _ = load(source, model_class=model_class, revision=revision, for_inference=False, **released)
    return model, processor


def check_repo_ids(repo_id: str, space: str | None) -> None:
    """Refuse, before any work, a repository or Space name the Hub would refuse at upload."""
    for option, name in (("--repo-id", repo_id), ("--space", space)):
        if name is None:
            continue
        try:
            validate_repo_id(name)
        except HFValidationError as error:
            raise InvalidArgumentError(f"{option} {name!r}: not a Hub repository name ({error}); use owner/name, "
                                       "e.g. me/ace-lora-mimic.") from None
        if "/" not in name:
            raise InvalidArgumentError(f"{option} {name!r}: name its owner too, e.g. me/{name}.")


def check_example_image(example_image: str | Path | None) -> None:
    """Refuse, before any work, an --example-image that is not there or that cannot be drawn without matplotlib."""
    if example_image is not None:
        if not Path(example_image).is_file():
            raise InvalidArgumentError(f"--example-image {example_image}: no such file; pass an image that exists.")
        require_plotting()


def card_picture_source(example_image: str | Path | None) -> Path | None:
    """The image the zero-shot card's explanation is drawn for: `example_image`, else the default X-ray where this is a
    source checkout with matplotlib installed (None, with a warning, otherwise)."""
    if example_image is not None:
        return Path(example_image)
    try:
        require_plotting()
    except ImportError as error:
        logger.warning("The card will show no explanation picture: %s", error)
        return None
    if not DEFAULT_EXAMPLE_IMAGE.is_file():
        logger.warning("The card will show no explanation picture: pass --example-image (%s is not here).",
                       DEFAULT_EXAMPLE_IMAGE)
        return None
    return DEFAULT_EXAMPLE_IMAGE


def draw_card_explanation(model, processor, image: Path, target: Path) -> None:
    """The model's explanation of `image` against the RSNA labels (No Finding, pneumonia), saved as `target`."""
    labels, templates = PRESETS[DEFAULT_PRESET]
    explanation = explain(ZeroShotClassifier(model, processor, templates), image, labels)
    plot_explanation(explanation, title=image.name).savefig(target)


def stage_repository(model: str | Path | None, repo_id: str, staging: str | Path, results: Sequence[str | Path] = (),
                     base_model: str = BIOMEDCLIP, overwrite: bool = False, space: str | None = None,
                     example_image: str | Path | None = None, calibration: str | Path | None = None,
                     **released_sources: str) -> Path:
    """Write everything the Hub repository of `model` holds into `staging` (empty, or replaced with `overwrite`):
    weights, code, processor, the model card (with the subgroup rows of the `results` that have them) and, for a
    zero-shot model, its command line, its Inference Endpoints handler (`handler.py`, `requirements.txt`), the card's
    explanation picture of `example_image` (see `card_picture_source`) and the `calibration` file, if given, as
    `calibration.json`. `released_sources`: the released model's sources (`biomedclip`, `adapters`, `tokenizer`) and
    the `revision` of a Hub --model."""
    check_repo_ids(repo_id, space)
    released = model is None or str(model) == RELEASED
    reports = [(read_results(path), Path(path)) for path in results]
    evaluations = [result for report, path in reports for result in evaluation_results(report, path)]
    subgroups = [row for report, path in reports for row in subgroup_rows(report, path)]
    calibration = Calibration.load(calibration) if calibration is not None else None
    inputs = [Path(path) for path in (model, *results) if path is not None and Path(path).exists()]
    staging = check_output_folder(staging, inputs=inputs, overwrite=overwrite, option="--staging")
    check_example_image(example_image)
    with folder_lock(staging, "--staging"):
        loaded, processor = load_publishable(model, **released_sources)
        zero_shot = type(loaded).__name__ == "AceLoraModel"
        if calibration is not None and not zero_shot:
            raise InvalidArgumentError(f"--calibration: {type(loaded).__name__} is not a zero-shot model; a "
                                       "calibration file goes with a zero-shot model only.")
        picture = card_picture_source(example_image) if zero_shot else None
        card = render_model_card(repo_id, type(loaded).__name__, evaluations, released, base_model, space,
                                 EXPLANATION_NAME if picture else None, f"`{picture.name}`" if picture else "",
                                 subgroups, calibration)
        with atomic_folder(staging, others="refuse", option="--staging") as folder:  # the folder is uploaded
            if picture:
                draw_card_explanation(loaded, processor, picture, folder / EXPLANATION_NAME)
            loaded.save_pretrained(folder)
            processor.save_pretrained(folder)
            if zero_shot:
                (folder / INFERENCE_SCRIPT_NAME).write_text(INFERENCE_SCRIPT.format(repo_id=repo_id), encoding="utf-8")
                add_endpoint_files(folder)
            if calibration is not None:
                (folder / CALIBRATION_NAME).write_text(json.dumps(calibration.to_dict(), indent=2), encoding="utf-8")
            card.save(folder / "README.md")
    return staging


def upload(staging: Path, repo_id: str, private: bool) -> str:
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=staging, repo_id=repo_id, commit_message="Upload ACE-LoRA").commit_url
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        raise ModelSourceError(f"--repo-id {repo_id}: the Hub refused the upload ({status}); log in with "
                               "hf auth login (a token that may write), or check the repository name.") from None
    except Exception as error:  # offline, or no route to the Hub: each HTTP client names its own error class
        if not isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) and \
                not _is_network_error(error):
            raise
        reason = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else type(error).__name__
        raise ModelSourceError(f"--push: the Hub cannot be reached ({reason}); the repository is staged in {staging}: "
                               f"upload it later with hf upload {repo_id} {staging} .") from None


def _is_network_error(error: Exception) -> bool:
    """An error of the HTTP client huggingface_hub uses (httpx, requests) about the network, not about our code."""
    return type(error).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")) and any(
        kind.__name__ in ("TransportError", "ConnectionError", "Timeout") for kind in type(error).__mro__)


__all__ = ["load_publishable", "stage_repository", "upload"]
