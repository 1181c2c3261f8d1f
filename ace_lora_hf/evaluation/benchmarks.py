"""Zero-shot evaluation of ACE-LoRA on the paper's benchmarks (tables written by dataset_prep/; the command is
`ace-lora-evaluate`, `ace_lora_hf.cli.evaluate`). Metrics as the authors define them: top-1 accuracy and ROC AUC for
single-label sets (the positive class's AUC for binary ones, macro one-vs-rest otherwise), macro multi-label AUC for
ChestX-ray14; each with a seeded 95% bootstrap confidence interval over images, and on the paper's 0-100 scale beside
its published number. A multi-label table (ChestX-ray14, or a user's table of 0/1 finding columns) can instead be
scored per finding (each finding's prompts against its negative ones), with an interval for each finding's AUC too.
"""


from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bootstrap import bootstrap_intervals
from .calibration import calibration_metrics
from ..data.image_tables import numbered_rows, parse_number, read_table
from ..errors import DataFormatError
from .metrics import classification_metrics, multilabel_metrics
from .published import PUBLISHED_RESULTS
from .subgroups import subgroup_metrics
from ..models.ace_lora.zero_shot import (CHEST_XRAY_TEMPLATES, PATHOLOGY_TEMPLATES, ZeroShotClassifier,
                                         zero_shot_probabilities)
from ..outputs.terminal import printable


@dataclass(frozen=True)
class Benchmark:
    table: str  # the prepared table's file name
    classes: dict[str, str]  # value of the target column (or, multi-label, the column) -> prompt class name
    target: str | None = "label"  # None: multi-label, one 0/1 column per class
    templates: tuple[str, ...] = CHEST_XRAY_TEMPLATES
    split: str | None = None  # evaluate only rows of this split
    published: str | None = None  # dataset name in PUBLISHED_RESULTS
    per_finding: bool = False  # multi-label only: each class scored against its negative prompts, not a softmax


NIH14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
BENCHMARKS = {
    "chexpert_5x200": Benchmark(
        "chexpert_5x200.csv",
        {name: name for name in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")},
        published="CheXpert 5x200"),
    "rsna": Benchmark("rsna_classification.csv", {"0": "No Finding", "1": "pneumonia"}, target="Target",
                      split="test", published="RSNA Pneumonia"),
    "siim": Benchmark("siim_classification.csv", {"0": "No Finding", "1": "pneumothorax"}, target="Target",
                      split="test"),
    "chestxray14": Benchmark("chestxray14_test.csv", {name: name.replace("_", " ").lower() for name in NIH14},
                             target=None),
    "lc25000_lung": Benchmark(
        "lc25000_lung.csv",
        {"lung_aca": "lung adenocarcinoma", "lung_n": "benign lung tissue", "lung_scc": "lung squamous cell carcinoma"},
        templates=PATHOLOGY_TEMPLATES, published="LC25000 (lung)"),
    "lc25000_colon": Benchmark(
        "lc25000_colon.csv", {"colon_aca": "colon adenocarcinoma", "colon_n": "benign colonic tissue"},
        templates=PATHOLOGY_TEMPLATES, published="LC25000 (colon)"),
    "mhist": Benchmark("mhist_test.csv", {"HP": "hyperplastic polyp", "SSA": "sessile serrated adenoma"},
                       templates=PATHOLOGY_TEMPLATES, split="test", published="MHIST"),
}


# ------------------------------------------------------------------------------------------------------ tables


def findings_benchmark(table: Path, columns: Sequence[str]) -> Benchmark:
    """A user's multi-label table (columns Path and one 0/1 column per finding, named as the prompts name it, such
    as full CheXpert or MIMIC-CXR labels), scored per finding."""
    return Benchmark(table.name, {column: column for column in columns}, target=None, per_finding=True)


def read_benchmark(benchmark: Benchmark, table_path: Path, data_root: Path) -> tuple[list[str], list]:
    """Image paths and references: class indices, or multi-hot rows for a multi-label set."""
    if not table_path.is_file():
        raise DataFormatError(f"{table_path} not found: run the dataset's dataset_prep script first (see README).")
    columns = ["Path", *([benchmark.target] if benchmark.target else benchmark.classes)]
    frame = read_table(table_path, columns, "--table", split=benchmark.split, unique="Path")
    images, references = [], []
    for line, record in numbered_rows(frame):
        if not record["Path"].strip():
            raise DataFormatError(f"{table_path}, line {line}: column 'Path' is empty; give the image's path.")
        images.append(str(data_root / record["Path"]))
        references.append(_reference(benchmark, record, table_path, line))
    return images, references


def _reference(benchmark: Benchmark, record: dict, table_path: Path, line: int) -> int | list[int]:
    if benchmark.target is None:
        return [int(parse_number(record[column], (0.0, 1.0), table_path, line, column, allow_empty=False))
                for column in benchmark.classes]
    classes = list(benchmark.classes)
    if record[benchmark.target] not in classes:
        raise DataFormatError(f"{table_path}, line {line}: column {benchmark.target!r} is "
                              f"{record[benchmark.target]!r}; expected one of {classes}.")
    return classes.index(record[benchmark.target])


def table_columns(benchmark: Benchmark, table_path: Path, columns: list[str]) -> dict[str, list[str]]:
    """Column -> its cell per row (in `read_benchmark`'s order) of `columns` of the table, e.g. the subgroup columns;
    a column the table lacks is refused with the table's columns named."""
    frame = read_table(table_path, columns, "--table", split=benchmark.split,
                       column_advice="Choose --subgroup-columns among the table's columns.")
    return {column: [value.strip() for value in frame[column]] for column in columns}


def published_result(name: str | None) -> dict | None:
    """The paper's number for this benchmark (on its 0-100 scale), if it reports one."""
    return next(({"metric": metric, "value": value} for _, dataset, metric, value in PUBLISHED_RESULTS
                 if dataset == name), None)


# --------------------------------------------------------------------------------------------------- evaluation


def scores(benchmark: Benchmark, probabilities: np.ndarray, references: np.ndarray) -> dict:
    if benchmark.target is None:
        return multilabel_metrics(probabilities, references)
    return classification_metrics(probabilities, references)


@dataclass
class ZeroShotScores:
    """Zero-shot logits of the readable images (`[n, C]`; per finding `[n, F, 2]`), their indices in the image list,
    the skipped ones, and the negative templates of per-finding scores."""

    logits: np.ndarray
    kept: list[int]
    skipped: list[dict]
    negative_templates: list[str] | None = None


def benchmark_scores(name: str, classifier: ZeroShotClassifier, images: list[str], labels: list[str],
                     per_finding: bool = False) -> ZeroShotScores:
    """Classify `images` against `labels` (`per_finding`: each label as a finding of its own); an unreadable image is
    skipped (and listed), none readable is an error."""
    logits, kept, skipped = [], [], []
    for batch in classifier.classify(images, labels, multi_label=per_finding):
        logits += batch.logits.tolist()
        kept += batch.indices
        skipped += [{"image": images[index], "error": reason} for index, reason in batch.failures]
    if not kept:
        raise DataFormatError(f"{name}: none of its {len(images)} images could be read (first: "
                              f"{skipped[0]['image']}: {skipped[0]['error']}).")
    negatives = list(classifier.negative_templates) if per_finding else None
    return ZeroShotScores(np.asarray(logits, dtype=np.float32), kept, skipped, negatives)


def probabilities_of(logits: np.ndarray) -> np.ndarray:
    """The zero-shot probabilities of `logits`, computed as the classifier computes them."""
    return zero_shot_probabilities(torch.from_numpy(logits)).numpy()


def evaluate_benchmark(name: str, classified: ZeroShotScores, images: list[str], references: list, resamples: int,
                       seed: int, subgroups: dict[str, list[str]] | None = None,
                       benchmark: Benchmark | None = None) -> dict:
    """Metrics, their bootstrap intervals and the paper's comparison for one benchmark (`benchmark`, default the one
    of that name), with the calibration of its probabilities and, given `subgroups` (column -> value per image), every
    metric per subgroup."""
    benchmark = benchmark or BENCHMARKS[name]
    labels = list(benchmark.classes.values())
    logits, kept, skipped = classified.logits, classified.kept, classified.skipped
    predictions, truth = probabilities_of(logits), np.asarray([references[index] for index in kept])
    metrics = scores(benchmark, predictions, truth)
    intervals = bootstrap_intervals(lambda p, r: scores(benchmark, p, r), predictions, truth, resamples, seed)
    published = published_result(benchmark.published)
    result = {
        "num_images": len(kept), "classes": labels, "templates": list(benchmark.templates),
        **({"per_finding": True, "negative_templates": classified.negative_templates} if benchmark.per_finding
           else {}),
        "metrics": metrics, "confidence_intervals_95": intervals,
        "paper_scale": {metric: 100 * value for metric, value in metrics.items() if np.isscalar(value)},
        "published": published, "calibration": {
            "metrics": calibration_metrics(predictions, truth),
            "confidence_intervals_95": bootstrap_intervals(calibration_metrics, predictions, truth, resamples, seed)},
        "skipped": skipped,
        "images": [{"image": images[index], "probabilities": row} for index, row in zip(kept, predictions.tolist())],
    }
    if subgroups:
        result["subgroups"] = subgroup_metrics(
            lambda p, r: {**scores(benchmark, p, r), **calibration_metrics(p, r)}, predictions, truth,
            {column: [values[index] for index in kept] for column, values in subgroups.items()}, resamples, seed)
    return result


def format_interval(bounds: list[float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def print_result(name: str, result: dict) -> None:
    published = result["published"] or {}
    print(f"\n{name}: {result['num_images']} images" + (f", {len(result['skipped'])} skipped" if result["skipped"]
                                                          else ""))
    print(f"  {'metric':<10}{'value':>8}{'95% CI':>18}{'paper':>8}")
    for metric, value in result["paper_scale"].items():
        low, high = (100 * bound for bound in result["confidence_intervals_95"][metric])
        paper = f"{published['value']:.2f}" if published.get("metric", "").lower() == metric else ""
        print(f"  {metric:<10}{value:>8.2f}{f'[{low:.2f}, {high:.2f}]':>18}{paper:>8}")
    calibration = result["calibration"]
    intervals = calibration["confidence_intervals_95"]
    print("  calibration: " + ", ".join(f"{metric} {value:.4f} {format_interval(intervals[metric])}"
                                        for metric, value in calibration["metrics"].items()))
    if "auc_per_class" in result["metrics"]:
        print(f"  {'AUC per finding':<28}{'value':>8}{'95% CI':>18}")
        for label, value, (low, high) in zip(result["classes"], result["metrics"]["auc_per_class"],
                                             result["confidence_intervals_95"]["auc_per_class"]):
            print(f"  {printable(label)[:28]:<28}{100 * value:>8.2f}{f'[{100 * low:.2f}, {100 * high:.2f}]':>18}")
    for entry in result["skipped"]:
        print(f"  skipped {entry['image']}: {entry['error']}")


__all__ = ["BENCHMARKS", "Benchmark", "ZeroShotScores", "evaluate_benchmark", "findings_benchmark", "format_interval",
           "print_result", "probabilities_of", "published_result", "read_benchmark", "table_columns",
           "benchmark_scores"]
