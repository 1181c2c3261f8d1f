#!/usr/bin/env python
"""Zero-shot evaluation of ACE-LoRA on the paper's benchmarks (tables written by dataset_prep/).

    python examples/zero_shot_eval.py --dataset rsna --model aydnarda/ACE-LoRA --data-root rsna-pneumonia/ \
        --table rsna/rsna_classification.csv --output rsna_results.json

--data-root is the dataset's image root (the --input given to dataset_prep); --table defaults to the prepared
table's name inside it. Metrics as the authors define them: top-1 accuracy and ROC AUC for single-label sets
(the positive class's AUC for binary ones, macro one-vs-rest otherwise), macro multi-label AUC for NIH-14.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import evaluate
import pandas as pd
import torch
from transformers import AutoModel, AutoProcessor

import ace_lora_hf  # noqa: F401  (registers the Auto classes)
from ace_lora_hf.evaluate_modules import metric_path
from ace_lora_hf.errors import ImageLoadError
from ace_lora_hf.model_card import PUBLISHED_RESULTS
from ace_lora_hf.zero_shot import CHEST_XRAY_TEMPLATES, PATHOLOGY_TEMPLATES, ZeroShotClassifier


@dataclass(frozen=True)
class Benchmark:
    table: str  # the prepared table's file name
    classes: dict[str, str]  # value of the target column (or, multi-label, the column) -> prompt class name
    target: str | None = "label"  # None: multi-label, one 0/1 column per class
    templates: tuple[str, ...] = CHEST_XRAY_TEMPLATES
    split: str | None = None  # evaluate only rows of this split
    published: str | None = None  # dataset name in PUBLISHED_RESULTS


NIH14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
BENCHMARKS = {
    "chexpert5x200": Benchmark(
        "chexpert_5x200.csv",
        {name: name for name in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")},
        published="CheXpert 5x200"),
    "rsna": Benchmark("rsna_classification.csv", {"0": "No Finding", "1": "pneumonia"}, target="Target",
                      split="test", published="RSNA Pneumonia"),
    "siim": Benchmark("siim_classification.csv", {"0": "No Finding", "1": "pneumothorax"}, target="Target",
                      split="test"),
    "nih14": Benchmark("chestxray14_test.csv", {name: name.replace("_", " ").lower() for name in NIH14}, target=None),
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


def read_benchmark(benchmark: Benchmark, table_path: Path, data_root: Path) -> tuple[list[Path], list]:
    """Image paths and references: class indices, or multi-hot rows for a multi-label set."""
    if not table_path.is_file():
        raise SystemExit(f"{table_path} not found: run the dataset's dataset_prep script first (see README).")
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    columns = ["Path", *([benchmark.target] if benchmark.target else benchmark.classes)]
    columns += ["split"] if benchmark.split else []
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SystemExit(f"{table_path}: missing column(s) {missing}; found {list(table.columns)}.")
    if benchmark.split:
        table = table[table["split"] == benchmark.split]
    if table.empty:
        raise SystemExit(f"{table_path}: no rows" + (f" in split {benchmark.split!r}." if benchmark.split else "."))
    if benchmark.target is None:
        references = table[list(benchmark.classes)].astype(int).values.tolist()
    else:
        index = {value: position for position, value in enumerate(benchmark.classes)}
        unknown = sorted(set(table[benchmark.target]) - set(index))
        if unknown:
            raise SystemExit(f"{table_path}: unknown {benchmark.target} value(s) {unknown}; expected {list(index)}.")
        references = [index[value] for value in table[benchmark.target]]
    return [data_root / path for path in table["Path"]], references


def published_result(name: str | None) -> dict | None:
    """The paper's number for this benchmark, if it reports one."""
    return next(({"metric": metric, "value": value} for _, dataset, metric, value in PUBLISHED_RESULTS
                 if dataset == name), None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--model", default="aydnarda/ACE-LoRA", help="Hub id or local folder.")
    parser.add_argument("--data-root", type=Path, required=True, help="The dataset's image root.")
    parser.add_argument("--table", type=Path, help="The prepared table (default: DATA_ROOT/<its name>).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="Write metrics and per-image probabilities as JSON.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    args = parser.parse_args(argv)
    if args.output and args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchmark = BENCHMARKS[args.dataset]
    images, references = read_benchmark(benchmark, args.table or args.data_root / benchmark.table, args.data_root)
    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    classifier = ZeroShotClassifier(model, processor, benchmark.templates, args.batch_size, show_progress=True)
    try:
        probabilities = classifier(images, list(benchmark.classes.values()))
    except ImageLoadError as error:
        raise SystemExit(f"Cannot evaluate: {error}") from error
    metric = evaluate.load(metric_path("classification"),
                           config_name="multilabel" if benchmark.target is None else "multiclass")
    metrics = metric.compute(predictions=probabilities.tolist(), references=references)
    results = {"dataset": args.dataset, "model": args.model, "num_images": len(images),
               "classes": list(benchmark.classes.values()), "templates": list(benchmark.templates),
               "metrics": metrics, "published": published_result(benchmark.published)}
    print(json.dumps({k: v for k, v in results.items() if k != "templates"}, indent=2))
    if args.output:
        results["images"] = [{"image": str(i), "probabilities": p} for i, p in zip(images, probabilities.tolist())]
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
