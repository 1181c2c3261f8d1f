"""The Hub model card (README.md) of an ACE-LoRA repository, built from data with `huggingface_hub`: metadata in
`ModelCardData`, results as `EvalResult`s, the text from a template.

Results come from the evaluation of the model being published (a fine-tune's `test_results.json`, the JSON of
`ace-lora-evaluate --output`). The paper's numbers appear only on the card of the released weights, labelled
as the paper's.
"""

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import DataFormatError
from ..evaluation.published import PUBLISHED_RESULTS
from ..inference.intended_use import INTENDED_USE
from ..models.ace_lora.calibration import Calibration


BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
PAPER_URL = "https://arxiv.org/abs/2603.17079"
PAPER = "ACE-LoRA paper (arXiv 2603.17079)"
EVALUATION = "ace-lora-hf evaluation of this model"


# Each benchmark's identity in model-index metadata: (dataset type, config). Entries with the same task, type and
# config are one model-index entry, so the two LC25000 sets are told apart by their config.
DATASETS = {
    "RSNA Pneumonia": ("rsna-pneumonia", None),
    "CheXpert 5x200": ("chexpert-5x200", None),
    "SIIM-ACR Pneumothorax": ("siim-acr-pneumothorax", None),
    "ChestX-ray14": ("chestx-ray14", None),
    "MHIST": ("mhist", None),
    "LC25000 (lung)": ("lc25000", "lung"),
    "LC25000 (colon)": ("lc25000", "colon"),
}
# `ace-lora-evaluate --dataset` names -> benchmark names (chexpert5x200 and nih14: what reports of 0.1 name them).
ZERO_SHOT_BENCHMARKS = {"rsna": "RSNA Pneumonia", "chexpert_5x200": "CheXpert 5x200",
                        "siim": "SIIM-ACR Pneumothorax", "chestxray14": "ChestX-ray14", "mhist": "MHIST",
                        "lc25000_lung": "LC25000 (lung)", "lc25000_colon": "LC25000 (colon)",
                        "chexpert5x200": "CheXpert 5x200", "nih14": "ChestX-ray14"}
# Metric keys of the evaluation JSONs -> (model-index metric type, config, name on the card).
METRICS = {
    "accuracy": ("accuracy", None, "accuracy"),
    "auc": ("roc_auc", None, "AUC"),
    "dice_positive": ("dice", "positive-images", "Dice over the positive images"),
    "dice_pooled": ("dice", "pooled", "pooled Dice"),
    "map": ("map", "rsna-iou-0.4-0.75", "mAP"),
}
PAPER_METRICS = {"AUC": "auc", "accuracy": "accuracy", "Dice": "dice_positive", "mAP": "map"}
FINETUNING_TASKS = {"segmentation": "image-segmentation", "detection": "object-detection"}

# What each model class is for: pipeline tag and the usage snippet of its card.
PIPELINES = {
    "AceLoraModel": "zero-shot-image-classification",
    "AceLoraForSegmentation": "image-segmentation",
    "AceLoraForObjectDetection": "object-detection",
}
USAGE = {
    "AceLoraModel": '''\
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

labels = ["No Finding", "pneumonia"]
templates = ["a chest X-ray image of {{}}.", "Findings suggesting {{}}."]
prompts = processor(text=[t.format(label) for label in labels for t in templates], return_tensors="pt")
pixels = processor(images=Image.open("chest_xray.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    classes = model.get_class_embeddings(prompts["input_ids"].view(len(labels), len(templates), -1)).pooler_output
    image = model.get_image_features(pixels).pooler_output
    probabilities = (model.logit_scale * image @ classes.T).softmax(dim=-1)
print(dict(zip(labels, probabilities[0].tolist())))
''',
    "AceLoraForSegmentation": '''\
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, AutoProcessor

model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
pixels = processor(images=Image.open("chest_xray.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    mask = model(pixel_values=pixels).logits[0, 0] > 0  # in the processor's resized and cropped frame
print(f"{{mask.float().mean().item():.1%}} of the image predicted as foreground")
''',
    "AceLoraForObjectDetection": '''\
import torch
from PIL import Image
from transformers import AutoModelForObjectDetection, AutoProcessor

model = AutoModelForObjectDetection.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
pixels = processor(images=Image.open("chest_xray.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    outputs = model(pixel_values=pixels)
detections = model.post_process_object_detection(outputs, threshold=0.3, target_sizes=[pixels.shape[-2:]])[0]
print(detections["boxes"].tolist(), detections["scores"].tolist())  # x1, y1, x2, y2 in the processed frame
''',
}

EXPLANATION_CAPTION = (
    "The model's answer for {image}, as `ace-lora-classify --explain` and the demo draw it. Top row: the whole image "
    "with the square the model sees (resized and centre-cropped) outlined; that view with the five patches the "
    "hypergraph links to the CLS token, numbered by link weight; the CLS token's last-layer attention to each patch "
    "relative to an even spread (log scale, 1/8 to 8 times). Below, one map per label: the probability each patch "
    "alone would give that label, from 0 to 1, white at chance.")

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

ACE-LoRA adapts the generalist medical vision-language model [BiomedCLIP](https://huggingface.co/{{ biomedclip }})
to chest X-rays with rank-stabilised LoRA (r = 4) on the attention of both towers, an attention-guided hypergraph
(ACE-HGNN) over each tower's tokens, and a label-guided InfoNCE loss; about 0.97 M trainable parameters. Method:
*ACE-LoRA: Graph-Attentive Context Enhancement for Parameter-Efficient Adaptation of Medical Vision-Language Models*
(Aydın, Yilmaz, Koç, Çukur, [arXiv 2603.17079]({{ paper_url }})).

{{ provenance }}

## Usage

```python
{{ usage }}```
{% if zero_shot %}
The repository also serves its own zero-shot pipeline, DICOM included (with pydicom installed):
`pipeline("zero-shot-image-classification", model="{{ repo_id }}", trust_remote_code=True)`.

The ace-lora-hf package is not on PyPI: install it from a checkout of its source repository with
`pip install -e '.[app]'` (run in the checkout). It adds batched zero-shot classification of folders and tables and
the command line in this repository's `hf_model_inference.py` (`python hf_model_inference.py --images a.dcm b.png`).

## Try it

{% if space %}In the browser: [the demo Space](https://huggingface.co/spaces/{{ space }}); upload a PNG, JPEG or DICOM
image, edit the labels and see the probabilities with the explanation below.

{% endif %}On your machine, with ace-lora-hf installed as above: run `ace-lora-app --model {{ repo_id }}` and open
http://127.0.0.1:7860.

## Inference Endpoints

The repository's `handler.py` serves it on Hugging Face Inference Endpoints (or any server that loads a repository's
`handler.py`) from its own code, with the packages of its `requirements.txt`; class prompts are encoded once per
label set. Send base64 PNG, JPEG or DICOM files, one or a list (at most 32), with at most 64 labels and 16 templates:

```json
{"inputs": ["<base64 of a.dcm>", "<base64 of b.png>"],
 "parameters": {"candidate_labels": ["No Finding", "pneumonia"], "templates": ["a chest X-ray image of {}."]}}
```

The answer is the zero-shot pipeline's, one list per image (a single image: its list), highest score first:
`[[{"label": "pneumonia", "score": 0.81}, {"label": "No Finding", "score": 0.19}], ...]`. `templates` is optional
(default: the two above). An image that cannot be used (missing, not base64, unreadable, over 64 MiB or 50 million
pixels) gets `{"error": "image 1: ..."}` in its place; the other images are scored. Where the repository carries a
`calibration.json`, the scores are calibrated and each label with an operating threshold gets `"decision"`; the file
holds for its own labels and templates, so a request for others is refused unless its parameters say
`"calibrated": false` (raw scores).
{% endif %}{% if explanation %}
## What the model looks at

![Explanation of a zero-shot classification by {{ title }}]({{ explanation }})

{{ explanation_caption }}
{% endif %}
## {{ results_title }}
{% if results %}
| Dataset | Task | Metric | Value |
|---|---|---|---|
{% for result in results -%}
| {{ result.dataset_name }} | {{ result.task_type }} | {{ result.metric_name }} | {{ result.metric_value }} |
{% endfor %}{% for row in subgroup_rows -%}
| {{ row.dataset }} | {{ row.task }} | {{ row.metric }} | {{ row.value }} |
{% endfor %}
{{ results_note }}{% if subgroup_rows %} Subgroup rows: the same metric on the test images of one value of a
column of the test table (95% bootstrap interval in brackets), and the largest gap between that column's values.
{%- endif %}
{% else %}
No evaluation results were given when this card was written.
{% endif %}
## Intended use

{{ intended_use }}{% if calibration %}
## Calibration

This repository carries `calibration.json`, fitted with `ace-lora-evaluate --calibrate-on` on a labelled validation
table: temperature {{ "%.4f"|format(calibration.temperature) }}{% if calibration.target %} and per-label thresholds
for a target {{ calibration.target.metric }} of {{ calibration.target.value }}{% endif %}, for the labels and templates
it names.
Pass it to `ace-lora-classify --calibration`, to the pipeline (`calibration=` the downloaded file) or to
`ace-lora-app --calibration` for calibrated scores{% if calibration.target %} and yes/no decisions{% endif %}; without
it the scores are the model's own.
{% endif %}"""


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+()\-]{0,63}")


def _dataset(name: str) -> dict:
    dataset_type, config = DATASETS.get(name, (name.lower().replace(" ", "-"), None))
    return {"dataset_name": name, "dataset_type": dataset_type, "dataset_config": config}


def _result(task: str, dataset: str, metric_key: str, value: float, split: str | None = None,
            source: str | None = None, source_url: str | None = None, task_name: str | None = None) -> EvalResult:
    metric_type, metric_config, metric_name = METRICS[metric_key]
    return EvalResult(task_type=task, task_name=task_name, **_dataset(dataset), dataset_split=split,
                      metric_type=metric_type, metric_config=metric_config, metric_name=f"{metric_name} (%)",
                      metric_value=value, source_name=source, source_url=source_url)


def paper_results() -> list[EvalResult]:
    """The paper's results (for the released weights only), labelled with the paper as their source."""
    return [_result(result.task, result.dataset, PAPER_METRICS[result.metric], result.value, source=PAPER,
                    source_url=PAPER_URL) for result in PUBLISHED_RESULTS]


def evaluation_results(results: dict, path: Path) -> list[EvalResult]:
    """`EvalResult`s of an evaluation of this model: a fine-tune's `test_results.json` or the `--output` of
    `ace-lora-evaluate` (one or more zero-shot benchmarks); metrics in percent, without a source (the paper's results
    carry theirs). An undefined (null) metric is left out."""
    if results.get("task") in FINETUNING_TASKS:
        fraction = results.get("fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise DataFormatError(f"{path}: 'fraction' is {fraction!r}; expected a number in (0, 1]: write it again "
                                  "with the command that made it.")
        task_name = f"{results['task']} head on the frozen encoder, {fraction:.0%} of the training split"
        split = results.get("split")
        return _results_of(FINETUNING_TASKS[results["task"]], results.get("dataset"),
                           None if split is None else _plain_name(split, "split", path), task_name,
                           results.get("metrics"), path)
    benchmarks = results.get("datasets")
    if not isinstance(benchmarks, dict) or not benchmarks or any(name not in ZERO_SHOT_BENCHMARKS
                                                                  for name in benchmarks):
        raise DataFormatError(f"{path}: neither a fine-tune's test_results.json (task segmentation or detection) nor "
                              "the --output of ace-lora-evaluate on known datasets "
                              f"({', '.join(ZERO_SHOT_BENCHMARKS)}).")
    return [result for name, benchmark in benchmarks.items()
            for result in _results_of("zero-shot-image-classification", ZERO_SHOT_BENCHMARKS[name], None,
                                      "zero-shot classification", benchmark.get("metrics"), f"{path}: {name}")]


def subgroup_rows(results: dict, path: Path) -> list[dict]:
    """The card's subgroup rows of an `ace-lora-evaluate --subgroup-columns` report: each metric of the card per value
    of each column (in percent, with its interval), then the largest gap per column; none for other reports."""
    rows = []
    for name, benchmark in (results.get("datasets") or {}).items():
        for column, entry in (benchmark.get("subgroups") or {}).items() if isinstance(benchmark, dict) else ():
            where = f"{path}: {name}, subgroups"
            _plain_name(column, "subgroup column", where)
            dataset = ZERO_SHOT_BENCHMARKS.get(name, name)
            for value, group in entry["groups"].items():
                _plain_name(value, f"value of {column}", where)
                rows += [{"dataset": f"{dataset}, {column} {value} (n = {group['num_images']})",
                          "task": "zero-shot-image-classification", "metric": f"{METRICS[key][2]} (%)",
                          "value": f"{100 * metric:.2f}{_percent_interval(group, key)}"}
                         for key, metric in group["metrics"].items() if key in METRICS and _is_number(metric)]
            rows += [{"dataset": f"{dataset}, largest gap across {column} ({gap['highest']} vs {gap['lowest']})",
                      "task": "zero-shot-image-classification", "metric": f"{METRICS[key][2]} (% points)",
                      "value": f"{100 * gap['gap']:.2f}"}
                     for key, gap in entry["largest_gap"].items() if key in METRICS]
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent_interval(group: dict, key: str) -> str:
    low, high = group.get("confidence_intervals_95", {}).get(key, (None, None))
    return f" [{100 * low:.2f}, {100 * high:.2f}]" if _is_number(low) and _is_number(high) else ""


def _plain_name(value, field: str, where) -> str:
    """A dataset or split name as the card may show it: plain words, nothing a Markdown or HTML renderer would turn
    into markup, a heading or a link."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        raise DataFormatError(f"{where}: {field!r} is {value!r}; a name on the card is letters, digits, spaces and "
                              ". _ - + ( ), at most 64 characters: write it again with the command that made it.")
    return value


def _results_of(task: str, dataset, split: str | None, task_name: str, metrics, where) -> list[EvalResult]:
    if not isinstance(dataset, str):
        raise DataFormatError(f"{where}: no 'dataset' name.")
    _plain_name(dataset, "dataset", where)
    if not isinstance(metrics, dict):
        raise DataFormatError(f"{where}: no 'metrics'; write it again with the command that made it.")
    return [_result(task, dataset, key, round(100 * value, 2), split, task_name=task_name)
            for key, value in metrics.items() if key in METRICS and isinstance(value, (int, float))]


def render_model_card(repo_id: str, model_class: str = "AceLoraModel", results: list[EvalResult] = (),
                      released: bool = False, base_model: str = BIOMEDCLIP, space: str | None = None,
                      explanation: str | None = None, explanation_of: str = "an image",
                      subgroups: list[dict] = (), calibration: Calibration | None = None) -> ModelCard:
    """The model card of `repo_id`: an ACE-LoRA model (`model_class`) with the evaluation `results` given (and their
    `subgroups` rows, see `subgroup_rows`). With `released`, the card is that of the authors' released weights and adds
    the paper's results. A zero-shot model's card says how to try it (the demo `space` on the Hub, when there is one,
    and locally) and shows `explanation`, the repository's picture of its explanation of `explanation_of`; with
    `calibration`, it describes the repository's calibration file."""
    own_results = list(results)
    all_results = [*own_results, *(paper_results() if released else [])]
    card_data = ModelCardData(
        license="mit", library_name="transformers", pipeline_tag=PIPELINES[model_class], base_model=base_model,
        datasets=["MIMIC-CXR-JPG"] if released else None, model_name=repo_id.split("/")[-1],
        tags=["medical", "radiology", "chest-x-ray", "vision-language", "biomedclip", "lora", "peft", "hypergraph",
              "ace-lora"],
        eval_results=all_results or None,
    )
    if released:
        provenance = "Weights: the authors' release (MIT), trained on MIMIC-CXR by the paper's recipe."
        results_title, results_note = "Results reported in the paper", f"Source: the {PAPER}."
        if own_results:
            results_title = "Results"
            results_note = f"Sources: {EVALUATION} (split given), then the {PAPER} (no split given)."
    else:
        provenance = (f"Weights: trained with ace-lora-hf from [{base_model}](https://huggingface.co/{base_model}) by "
                      "the author of this repository; they are not the paper's released weights, and the paper's "
                      "results do not describe them.")
        results_title, results_note = "Evaluation results", f"Source: {EVALUATION}, on the test split named."
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE, title=repo_id.split("/")[-1], biomedclip=BIOMEDCLIP, paper_url=PAPER_URL,
        provenance=provenance, usage=USAGE[model_class].format(repo_id=repo_id), repo_id=repo_id,
        zero_shot=model_class == "AceLoraModel", space=space, explanation=explanation,
        explanation_caption=EXPLANATION_CAPTION.format(image=explanation_of), results_title=results_title,
        results=all_results, results_note=results_note, subgroup_rows=list(subgroups), intended_use=INTENDED_USE,
        calibration=calibration)


__all__ = ["BIOMEDCLIP", "evaluation_results", "paper_results", "render_model_card", "subgroup_rows"]
