"""Zero-shot evaluation of ACE-LoRA on the paper's benchmarks (tables written by `ace-lora-prepare`).

    ace-lora-evaluate --dataset rsna --data-root rsna-pneumonia/ --output results.json
    ace-lora-evaluate --dataset lc25000_lung --dataset lc25000_colon --data-root lung_colon_image_set/
    python examples/zero_shot_eval.py --dataset mhist --data-root MHIST/ --model runs/ace/

Datasets carry the names `ace-lora-prepare` gives them (chexpert5x200 and nih14, the names of 0.1, are accepted too).
--data-root is the dataset's image root (the --input given to ace-lora-prepare); --table defaults to the prepared
table's name inside it. Give --dataset several times to evaluate several benchmarks with one model load, with one
--data-root (and --table) per dataset or one for all. Metrics as the authors define them: top-1 accuracy and ROC AUC
for single-label sets (the positive class's AUC for binary ones, macro one-vs-rest otherwise), macro multi-label AUC
for ChestX-ray14; each with a seeded 95% bootstrap confidence interval over images (--bootstrap N resamples), and on
the paper's 0-100 scale beside its published number. Every report gives the expected calibration error (15
equal-width bins on the top-class confidence; per finding for multi-label sets), the Brier score and, with --output,
a reliability diagram and ROC and precision-recall curves as PNGs beside the report (with the [plot] extra).
Unreadable images are reported and left out (exit status 3).

    ace-lora-evaluate --dataset rsna --data-root rsna/ --calibrate-on rsna/val.csv --target-sensitivity 0.95 \
        --subgroup-columns sex,age_group,view --calibration-output rsna_calibration.json --output results.json

--calibrate-on fits a temperature on a validation table in the benchmark's layout (its rows not in the test table;
paths relative to --data-root) and reports NLL, ECE and Brier before and after; with --target-sensitivity or
--target-specificity, also each label's threshold found there and its sensitivity, specificity, PPV and NPV on the
test table with intervals. --calibration-output saves both in a calibration file for ace-lora-classify --calibration.
--subgroup-columns reports every metric per value of those columns of the test table, and the largest gap.

    ace-lora-evaluate --dataset chestxray14 --data-root nih/ --multi-label
    ace-lora-evaluate --findings Atelectasis Edema "Pleural Effusion" --table labels.csv --data-root images/

--multi-label scores each class of a multi-label table as a finding of its own (its prompts against "no {}" ones)
instead of the authors' softmax over the classes. --findings evaluates a table of your own (columns Path and one 0/1
column per finding, each named as a prompt should name it) that way: the AUC of each finding with its interval, and
their macro mean.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import EXIT_INPUTS_SKIPPED, run_cli
from .options import (add_batch_options, add_device_options, add_model_options, add_option, add_output_options,
                      add_per_finding_options, check_paths_exist, command_parser, model_summary)
from ..errors import InvalidArgumentError


# The names of ace_lora_hf.evaluation.benchmarks.BENCHMARKS (kept here so that --help needs no torch).
DATASETS = ("chestxray14", "chexpert_5x200", "lc25000_colon", "lc25000_lung", "mhist", "rsna", "siim")
DATASET_ALIASES = {"chexpert5x200": "chexpert_5x200", "nih14": "chestxray14"}  # the names of 0.1
FINDINGS = "findings"  # the report's name for a --findings table


def dataset_name(text: str) -> str:
    name = DATASET_ALIASES.get(text, text)
    if name not in DATASETS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a benchmark; choose from {', '.join(DATASETS)}")
    return name


def target_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a value strictly between 0 and 1, e.g. 0.95")
    return value


def column_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give column names separated by commas, e.g. sex,age_group,view")
    return names


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration, operating points and subgroups")
    add_option(group, "--calibrate-on", type=Path, help="Validation table (the benchmark's layout) to fit the "
                                                        "temperature and the operating thresholds on.")
    targets = group.add_mutually_exclusive_group()
    add_option(targets, "--target-sensitivity", type=target_value, help="Operating point: each label's threshold "
                                                                        "reaching this sensitivity on validation.")
    add_option(targets, "--target-specificity", type=target_value, help="Operating point: each label's threshold "
                                                                        "reaching this specificity on validation.")
    add_option(group, "--calibration-output", type=Path, help="Write the calibration file (JSON) here (never into "
                                                              "the --model folder).")
    add_option(group, "--subgroup-columns", type=column_names, default=[],
               help="Columns of the test table to report every metric per value of, e.g. sex,age_group,view.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-evaluate", __doc__)
    sets = parser.add_mutually_exclusive_group(required=True)
    add_option(sets, "--dataset", action="append", type=dataset_name,
               metavar="{" + ",".join(DATASETS) + "}", help="A benchmark (repeatable).")
    add_option(sets, "--findings", nargs="+", metavar="COLUMN",
               help="Evaluate --table, a table of your own: its 0/1 columns of these findings, scored per finding.")
    add_option(parser, "--data-root", action="append", type=Path, required=True,
               help="The dataset's image root: one per --dataset, or one for all.")
    add_option(parser, "--table", action="append", type=Path, help="Prepared table(s) (default: DATA_ROOT/<name>).")
    add_option(parser, "--bootstrap", type=int, default=1000, help="Bootstrap resamples (default: %(default)s).")
    add_option(parser, "--seed", type=int, default=0, help="Seed of the bootstrap (default: %(default)s).")
    add_per_finding_options(parser, "Score a multi-label table per finding (each against 'no {}' prompts), not by a "
                                    "softmax.", "--multi-label or --findings")
    add_model_options(parser)
    add_device_options(parser)
    add_batch_options(parser)
    add_output_options(parser, "Write metrics and per-image probabilities as JSON.")
    add_calibration_options(parser)
    args = parser.parse_args(argv)
    if args.findings:
        if not args.table or len(args.table) != 1:
            parser.error("--findings: give the table of your own as one --table.")
        args.dataset, args.multi_label = [FINDINGS], True
    if args.negative_templates and not args.multi_label:
        parser.error("--negative-templates scores findings one by one: pass --multi-label (or --findings) too.")
    if args.calibrate_on and args.multi_label:
        parser.error("--calibrate-on fits a temperature and thresholds on single-label scores; per-finding scores "
                     "(--multi-label, --findings) are not calibrated: leave out one of the two.")
    for option in ("data_root", "table"):
        values = getattr(args, option)
        if values is not None and len(values) not in (1, len(args.dataset)):
            parser.error(f"--{option.replace('_', '-')}: give one for all datasets or one per --dataset "
                         f"({len(args.dataset)}).")
    if args.bootstrap < 1:
        parser.error("--bootstrap: at least 1 resample.")
    if args.calibrate_on is None:
        for option in ("target_sensitivity", "target_specificity", "calibration_output"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} needs --calibrate-on VAL.csv (the table it is fitted on).")
    elif len(args.dataset) != 1:
        parser.error("--calibrate-on: give one --dataset (the calibration is fitted for its labels).")
    return args


def _per_dataset(values: list | None, count: int) -> list:
    return [None] * count if values is None else values * count if len(values) == 1 else values


def chosen_benchmark(args: argparse.Namespace, name: str):
    """The `Benchmark` a dataset name stands for on this command line (--findings, --multi-label)."""
    from dataclasses import replace

    from ..evaluation.benchmarks import BENCHMARKS, findings_benchmark

    if name == FINDINGS:
        return findings_benchmark(args.table[0], args.findings)
    benchmark = BENCHMARKS[name]
    if not args.multi_label:
        return benchmark
    if benchmark.target is not None:
        raise InvalidArgumentError(f"--multi-label: {name} is single-label (one class per image); leave "
                                   "--multi-label out for it, or evaluate it on its own.")
    return replace(benchmark, per_finding=True)


def read_plans(args: argparse.Namespace) -> list[tuple[str, list[str], list, Path]]:
    """Every benchmark's images and references (and table), read and checked before the model loads."""
    from ..evaluation.benchmarks import read_benchmark

    count = len(args.dataset)
    if len(set(args.dataset)) != count:
        raise InvalidArgumentError(f"--dataset: {args.dataset} names a dataset twice.")
    check_paths_exist(args.data_root, "--data-root", "folder")
    check_paths_exist(args.table or [], "--table", "file")
    plans = []
    for name, root, table in zip(args.dataset, _per_dataset(args.data_root, count), _per_dataset(args.table, count)):
        benchmark = chosen_benchmark(args, name)
        table = table or root / benchmark.table
        plans.append((name, *read_benchmark(benchmark, table, root), table))
    return plans


def read_validation(args: argparse.Namespace, plans: list) -> tuple[list[str], list] | None:
    """The --calibrate-on table's images and references, read as the test table is; no image of the test table."""
    from dataclasses import replace

    import numpy as np

    from ..evaluation.benchmarks import BENCHMARKS, read_benchmark
    from ..evaluation.calibrated_evaluation import check_validation_targets
    from ..evaluation.operating_points import check_both_outcomes

    if args.calibrate_on is None:
        return None
    check_paths_exist([args.calibrate_on], "--calibrate-on", "file")
    name, test_images, _, table = plans[0]
    if BENCHMARKS[name].target is None:
        raise InvalidArgumentError(f"--calibrate-on: {name} is multi-label; calibration fits single-label tables "
                                   "(one class per image).")
    if args.calibrate_on.resolve() == table.resolve():
        raise InvalidArgumentError(f"--calibrate-on {args.calibrate_on} is the test table; fit on a validation table "
                                   "whose images are not in the test table.")
    images, references = read_benchmark(replace(BENCHMARKS[name], split=None), args.calibrate_on, args.data_root[0])
    shared = sorted(set(images) & set(test_images))
    if shared:
        raise InvalidArgumentError(f"--calibrate-on {args.calibrate_on}: {len(shared)} image(s) are also in the test "
                                   f"table {table} (first: {shared[0]}); fit on images the test table does not hold.")
    labels = list(BENCHMARKS[name].classes.values())
    check_validation_targets(references, labels, str(args.calibrate_on))
    if args.target_sensitivity is not None or args.target_specificity is not None:
        check_both_outcomes(np.asarray(references), labels, str(args.calibrate_on))
    return images, references


def check_calibration_output(args: argparse.Namespace, inputs: list[Path]) -> None:
    """The calibration file goes beside the model, never into it: a model folder holds what was published."""
    from ..outputs.safe_outputs import check_output_file

    if args.calibration_output is None:
        return
    if args.calibration_output.suffix.lower() != ".json":
        raise InvalidArgumentError(f"--calibration-output {args.calibration_output}: the file is JSON; name a .json "
                                   "file.")
    model = Path(str(args.model))
    if model.exists() and args.calibration_output.resolve().is_relative_to(model.resolve()):
        raise InvalidArgumentError(f"--calibration-output {args.calibration_output} is inside the --model folder "
                                   f"{model}; write it elsewhere (ace-lora-publish --calibration adds it to a repo).")
    check_output_file(args.calibration_output, inputs, overwrite=args.overwrite, option="--calibration-output")


def figure_stems(args: argparse.Namespace, plans: list) -> dict[str, Path]:
    """Dataset -> the stem of its PNGs beside --output, each checked like --output (none without matplotlib)."""
    from ..evaluation.calibrated_evaluation import FIGURES
    from ..evaluation.curves import PLOT_EXTRA_HINT, plotting_available
    from ..outputs.safe_outputs import check_output_file

    if not args.output:
        return {}
    if not plotting_available():
        print(f"note: no PNG figures without matplotlib ({PLOT_EXTRA_HINT})")
        return {}
    stems = {name: args.output.with_name(f"{args.output.stem}_{name}") for name, *_ in plans}
    for stem in stems.values():
        for figure in FIGURES:
            check_output_file(stem.with_name(f"{stem.name}_{figure}.png"), [table for *_, table in plans],
                              overwrite=args.overwrite)
    return stems


def calibrate(args: argparse.Namespace, name: str, classifier, validation: tuple[list[str], list], test,
              references: list, subgroups: dict | None) -> tuple[dict, object]:
    """--calibrate-on's calibration of dataset `name` and its report on the test table's scores."""
    from ..evaluation.calibrated_evaluation import calibrate_benchmark, print_calibrated

    target = next(((metric, getattr(args, f"target_{metric}")) for metric in ("sensitivity", "specificity")
                   if getattr(args, f"target_{metric}") is not None), None)
    report, calibration = calibrate_benchmark(name, classifier, validation, str(args.calibrate_on), test, references,
                                              subgroups, target, model_summary(args), args.bootstrap, args.seed)
    print_calibrated(report)
    return report, calibration


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import time

    import numpy as np

    from .options import check_model_source, load_model, make_accelerator, model_dtype
    from ..evaluation.benchmarks import benchmark_scores, evaluate_benchmark, print_result, table_columns
    from ..evaluation.calibrated_evaluation import print_subgroups, write_figures
    from ..inference.malloc_tuning import keep_freed_memory_for_reuse
    from ..models.ace_lora.zero_shot import ZeroShotClassifier, checked_templates
    from ..outputs.safe_outputs import check_output_file, folder_lock, write_json_atomic

    keep_freed_memory_for_reuse()
    if args.output and args.output.suffix.lower() != ".json":
        raise InvalidArgumentError(f"--output {args.output}: the report is JSON; name a .json file.")
    if args.negative_templates:
        checked_templates(args.negative_templates)
    plans = read_plans(args)
    subgroups = {name: table_columns(chosen_benchmark(args, name), table, args.subgroup_columns)
                 for name, *_, table in plans if args.subgroup_columns}
    validation = read_validation(args, plans)
    inputs = [table for *_, table in plans] + ([args.calibrate_on] if args.calibrate_on else [])
    if args.output:
        check_output_file(args.output, inputs, overwrite=args.overwrite)
    check_calibration_output(args, inputs)
    stems = figure_stems(args, plans)
    check_model_source(args)
    accelerator = make_accelerator(args.device)
    model, processor, _ = load_model(args, accelerator.device, model_dtype(args.dtype, accelerator.device))
    started, results, calibration = time.perf_counter(), {}, None
    for name, images, references, _ in plans:
        benchmark = chosen_benchmark(args, name)
        classifier = ZeroShotClassifier(model, processor, benchmark.templates, args.batch_size,
                                        args.num_workers, show_progress=True, accelerator=accelerator,
                                        negative_templates=args.negative_templates)
        scores = benchmark_scores(name, classifier, images, list(benchmark.classes.values()), benchmark.per_finding)
        results[name] = evaluate_benchmark(name, scores, images, references, args.bootstrap, args.seed,
                                           subgroups.get(name), benchmark)
        print_result(name, results[name])
        print_subgroups(results[name].get("subgroups", {}))
        if validation is not None:
            results[name]["calibrated"], calibration = calibrate(args, name, classifier, validation, scores,
                                                                 references, subgroups.get(name))
        if name in stems:
            figures = write_figures(scores.logits, np.asarray([references[index] for index in scores.kept]),
                                    list(benchmark.classes.values()), calibration, stems[name])
            results[name]["figures"] = [str(path) for path in figures]
    report = {"model": model_summary(args), "bootstrap": args.bootstrap, "seed": args.seed,
              "seconds": time.perf_counter() - started, "datasets": results}
    if calibration is not None and args.calibration_output:
        write_json_atomic(args.calibration_output, calibration.to_dict())
        print(f"\nwrote {args.calibration_output}")
    if args.output:
        with folder_lock(args.output):
            write_json_atomic(args.output, report)
        print(f"\nwrote {args.output}")
    skipped = any(result["skipped"] or result.get("calibrated", {}).get("skipped") for result in results.values())
    return EXIT_INPUTS_SKIPPED if skipped else 0


def cli() -> None:
    """The `ace-lora-evaluate` console script."""
    run_cli(main)


__all__ = ["DATASETS", "DATASET_ALIASES", "FINDINGS", "chosen_benchmark", "cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
