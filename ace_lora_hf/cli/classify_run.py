"""What `ace-lora-classify` runs once its options are parsed: the table, the result files and the summary."""

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from .common import EXIT_INPUTS_SKIPPED
from .options import (check_model_source, check_paths_exist, load_model, make_accelerator, model_dtype, model_summary,
                      released_options)
from ..errors import ImageLoadError, InvalidArgumentError
from ..evaluation.metrics import classification_metrics
from ..inference.dicom_ids import DICOM_ID_FIELDS, any_dicom, dicom_ids, is_dicom, missing_ids
from ..inference.explain import explain, plot_explanation, require_plotting
from ..inference.image_inputs import ImageInputs, collect_images, read_image_list, read_labelled_table
from ..inference.malloc_tuning import keep_freed_memory_for_reuse
from ..models.ace_lora.calibration import Calibration
from ..models.ace_lora.zero_shot import (CHEST_XRAY_TEMPLATES, ZeroShotClassifier, checked_classes, checked_templates,
                                         negated_templates)
from ..outputs.launched_processes import checks_alike_in_every_process
from ..outputs.result_files import ResultsFile
from ..outputs.terminal import printable
from ..outputs.safe_outputs import atomic_file, check_output_file, ensure_folder, folder_lock
from ..sources.load import model_identity


def read_inputs(args: argparse.Namespace) -> ImageInputs:
    """The images (and targets) to classify; a path typed on the command line that is not there is an error."""
    for option, path in (("--csv", args.csv), ("--image-list", args.image_list), ("--image-root", args.image_root)):
        check_paths_exist([path], option)
    if args.csv:
        return read_labelled_table(args.csv, args.image_root)
    if args.image_list:
        return ImageInputs(read_image_list(args.image_list, args.image_root), sources=[args.image_list])
    check_paths_exist(args.images, "--images", "image file or folder")
    return ImageInputs(collect_images(args.images, args.pattern))


class TablePrinter:
    """The probability table on stdout, a row as each image is classified.

    Names longer than `LONG_NAME` are shown relative to the folder all images share, which the header names once: a
    shown name still identifies its file, wherever the images lie.
    """

    LONG_NAME = 60

    def __init__(self, images: Sequence[str], labels: Sequence[str], enabled: bool):
        self.labels, self.enabled = labels, enabled
        self.folder = shared_folder(images) if any(len(image) > self.LONG_NAME for image in images) else ""
        heading = f"image (in {self.folder}{os.sep})" if self.folder else "image"
        self.name_width = max(len(heading), *(len(self._name(image)) for image in images))
        self.widths = [max(len(label), 6) for label in labels]
        self._print([heading.ljust(self.name_width), *(f"{l:>{w}}" for l, w in zip(labels, self.widths)),
                     "prediction"])

    def _name(self, image: str) -> str:
        return printable(os.path.relpath(image, self.folder) if self.folder else image)

    def _print(self, cells: list[str]) -> None:
        """One row, every cell escaped: names and labels come from the user's files."""
        if self.enabled:
            tqdm.write("  ".join(map(printable, cells)), file=sys.stdout)  # above the progress bar

    def row(self, record: dict) -> None:
        name = self._name(record["image"])
        if "error" in record:
            self._print([name.ljust(self.name_width), f"skipped: {record['error']}"])
            return
        cells = [f"{record['probabilities'][label]:>{width}.4f}" for label, width in zip(self.labels, self.widths)]
        self._print([name.ljust(self.name_width), *cells, record["prediction"]])


def shared_folder(images: Sequence[str]) -> str:
    """The deepest folder that holds every image ("" when they share none, e.g. relative and absolute paths)."""
    try:
        return os.path.commonpath([os.path.dirname(image) for image in images])
    except ValueError:
        return ""


def prediction(labels: Sequence[str], probabilities: list[float], multi_label: bool = False) -> str:
    """The most probable label; with `multi_label`, the findings more probable than not, joined by "; "."""
    if multi_label:
        return "; ".join(label for label, probability in zip(labels, probabilities) if probability > 0.5)
    return labels[max(range(len(labels)), key=probabilities.__getitem__)]


def batch_records(batch, images: list[str], labels: Sequence[str], targets: list[int] | None,
                  multi_label: bool = False, calibration: Calibration | None = None,
                  with_ids: bool = False) -> list[dict]:
    """One record per classified or skipped image of the batch, in input order; with a calibration, its
    probabilities, and the labels decided present where it holds thresholds; with `with_ids`, each carries its
    DICOM identifiers (empty for other files)."""
    records = [(index, {"image": images[index], "error": reason}) for index, reason in batch.failures]
    scores = batch.probabilities if calibration is None else calibration.apply(batch.logits)
    decisions = calibration.decide(scores) if calibration is not None and calibration.thresholds else None
    for row, (index, probabilities) in enumerate(zip(batch.indices, scores.tolist())):
        record = {"image": images[index], "probabilities": dict(zip(labels, probabilities)),
                  "prediction": prediction(labels, probabilities, multi_label)}
        if decisions is not None:
            record["decision"] = [label for label, decided in decisions.items() if decided[row]]
        if targets is not None:
            record["target"] = targets[index]
        records.append((index, record))
    if with_ids:
        for _, record in records:
            record["ids"] = dicom_ids(record["image"])
    return [record for _, record in sorted(records, key=lambda pair: pair[0])]


def id_fields(args: argparse.Namespace, inputs: ImageInputs) -> tuple[str, ...]:
    """The DICOM identifier fields of this run's rows: there when an input is DICOM, unless --no-dicom-ids."""
    return () if args.no_dicom_ids or not any_dicom(inputs.images) else DICOM_ID_FIELDS


def _check_outputs(args: argparse.Namespace, inputs: ImageInputs) -> None:
    """Every output path is checked before the model loads: not an input, not a folder, no silent replacement."""
    every_input = [*inputs.images, *(inputs.sources or [])]
    if args.output:
        check_output_file(args.output, every_input, overwrite=args.overwrite or args.resume)
    if args.explain:
        require_plotting()
        ensure_folder(args.explain, "--explain")
        for target in explanation_targets(args.explain, inputs.images).values():
            check_output_file(target, every_input, overwrite=args.overwrite, option="--explain")


def read_calibration(args: argparse.Namespace) -> Calibration | None:
    """--calibration's file, checked against --labels and --templates before the model loads."""
    if args.calibration is None:
        return None
    if args.multi_label:
        raise InvalidArgumentError("--calibration holds a temperature and thresholds fitted on single-label scores; "
                                   "--multi-label scores are not calibrated: leave out one of the two.")
    calibration = Calibration.load(args.calibration)
    calibration.check(args.labels, args.templates)
    return calibration


def classify_all(args: argparse.Namespace, inputs: ImageInputs, results: ResultsFile | None, accelerator,
                 calibration: Calibration | None = None) -> dict:
    """Classify the images not already in `results`; returns the run's summary."""
    labels = list(checked_run_labels(args))
    templates = checked_templates(args.templates)
    done = results.done if results is not None else set()
    todo = [index for index, image in enumerate(inputs.images) if image not in done]
    images = [inputs.images[index] for index in todo]
    targets = None if inputs.targets is None else [inputs.targets[index] for index in todo]
    device = accelerator.device
    model, processor, _ = load_model(args, device, model_dtype(args.dtype, device))
    classifier = ZeroShotClassifier(model, processor, templates, args.batch_size, args.num_workers,
                                    show_progress=accelerator.is_main_process, accelerator=accelerator,
                                    negative_templates=args.negative_templates)
    printer = TablePrinter(inputs.images, labels, enabled=accelerator.is_main_process and not args.quiet)
    started, records = time.perf_counter(), list(results.records if results is not None else [])
    for batch in classifier.classify(images, labels, multi_label=args.multi_label):
        new = batch_records(batch, images, labels, targets, args.multi_label, calibration,
                            bool(args.id_fields) and accelerator.is_main_process)
        if args.strict and batch.failures:
            raise ImageLoadError(images[batch.failures[0][0]], batch.failures[0][1])
        for record in new:
            printer.row(record)
        if results is not None and accelerator.is_main_process:
            results.write(new)
        records += new
    if args.explain and accelerator.is_main_process:
        write_explanations(classifier, [r["image"] for r in records if "error" not in r], labels,
                           explanation_targets(args.explain, inputs.images))
    return summarise(args, labels, templates, records, time.perf_counter() - started, len(images))


def summarise(args, labels: list[str], templates, records: list[dict], seconds: float, attempted: int) -> dict:
    classified = [record for record in records if "error" not in record]
    summary = {"model": model_summary(args), "labels": labels,
               "templates": list(templates), **per_finding_options(args),
               "calibration": str(args.calibration) if args.calibration else None, "classified": len(classified),
               "skipped": [{"image": r["image"], "error": r["error"]} for r in records if "error" in r]}
    if args.id_fields:
        summary["dicom_ids"] = list(args.id_fields)
        summary["without_dicom_ids"] = [{"image": r["image"], "missing": missing} for r in records
                                        if (missing := missing_ids(r.get("ids", {}))) and is_dicom(r["image"])]
    if classified and "target" in classified[0]:
        summary["metrics"] = classification_metrics([[r["probabilities"][label] for label in labels]
                                                     for r in classified], [r["target"] for r in classified])
    summary["seconds"], summary["images_per_second"] = seconds, attempted / seconds if seconds else 0.0
    return summary


def explanation_targets(folder: Path, images: Sequence[str]) -> dict[str, Path]:
    """`<stem>_explain.png` per image in `folder`, numbered where two images share a stem."""
    targets, used = {}, set()
    for image in images:
        stem, number = Path(image).stem, 1
        while (name := f"{stem}{f'_{number}' if number > 1 else ''}_explain.png") in used:
            number += 1
        used.add(name)
        targets[image] = folder / name
    return targets


def write_explanations(classifier: ZeroShotClassifier, images: list[str], labels: list[str],
                       targets: dict[str, Path]) -> None:
    for image in images:
        figure = plot_explanation(explain(classifier, image, labels), title=Path(image).name)
        with atomic_file(targets[image], "wb") as file:  # a link planted at the name is replaced, not written through
            figure.savefig(file, format="png")
        print(f"wrote {printable(str(targets[image]))}")


def report(summary: dict, results: ResultsFile | None) -> None:
    skipped = summary["skipped"]
    print(f"classified {summary['classified']} image(s), {summary['images_per_second']:.2f} images/s"
          + (f"; skipped {len(skipped)}:" if skipped else ""))
    for entry in skipped:
        print(f"  {printable(entry['image'])}: {printable(entry['error'])}")
    for entry in summary.get("without_dicom_ids", []):
        print(f"  {printable(entry['image'])}: its DICOM header has no {', '.join(entry['missing'])}; those fields of "
              "its row are empty")
    if "metrics" in summary:
        metrics = summary["metrics"]
        print(f"accuracy {metrics['accuracy']:.4f}  AUC ({summary['labels'][1]}) {metrics['auc']:.4f}")
    if results is not None:
        print(f"wrote {results.path}")


def checked_run_labels(args: argparse.Namespace) -> tuple[str, ...]:
    """The labels (with --multi-label: findings, one or more) and, with --multi-label, the negative templates."""
    return checked_classes(args.labels, args.multi_label, negative_templates=args.negative_templates)


def per_finding_options(args: argparse.Namespace) -> dict:
    """How --multi-label scored the findings, for the summary and the provenance (nothing without it)."""
    if not args.multi_label:
        return {}
    negatives = args.negative_templates or negated_templates(args.templates)
    return {"multi_label": True, "negative_templates": list(negatives)}


def run_provenance(args: argparse.Namespace, inputs: ImageInputs) -> dict:
    """What the numbers of this run depend on besides each image: recorded beside the results, checked by --resume."""
    inputs_digest = hashlib.sha256("\n".join(inputs.images).encode()).hexdigest()
    provenance = {"model": model_identity(args.model, args.revision, **released_options(args)), "dtype": args.dtype,
                  "templates": list(args.templates), **per_finding_options(args), "inputs": f"sha256:{inputs_digest}",
                  "dicom_ids": list(args.id_fields)}
    if args.calibration is not None:  # calibrated and raw probabilities never share a file
        provenance["calibration"] = f"sha256:{hashlib.sha256(args.calibration.read_bytes()).hexdigest()}"
    return provenance


# Every process checks the same inputs and receives every batch's results, failures included (gathered): an error
# is met alike by all of them.
@checks_alike_in_every_process()
def run(args: argparse.Namespace) -> int:
    """Classify what `args` name; the exit status."""
    keep_freed_memory_for_reuse()
    args.templates = list(args.templates or CHEST_XRAY_TEMPLATES)
    checked_templates(args.templates)
    labels = checked_run_labels(args)
    calibration = read_calibration(args)
    inputs = read_inputs(args)
    args.id_fields = id_fields(args, inputs)
    check_model_source(args)
    accelerator = make_accelerator(args.device)
    main_process = accelerator.is_main_process
    if main_process:
        _check_outputs(args, inputs)
    lock = folder_lock(args.output) if args.output and main_process else nullcontext()
    with lock:
        results = None
        if args.output and main_process:
            results = ResultsFile(args.output, labels, inputs.targets is not None, args.resume, args.overwrite,
                                  provenance=run_provenance(args, inputs), inputs=inputs.images,
                                  with_decision=bool(calibration and calibration.thresholds),
                                  id_fields=args.id_fields)
        summary = classify_all(args, inputs, results, accelerator, calibration)
        if main_process:
            if results is not None:
                results.finish(summary)
            report(summary, results)
    return EXIT_INPUTS_SKIPPED if summary["skipped"] else 0
