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
the paper's 0-100 scale beside its published number. Unreadable images are reported and left out (exit status 3).

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
                      check_paths_exist, command_parser, model_summary)
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
    add_option(parser, "--multi-label", action="store_true",
               help="Score a multi-label table per finding (each against 'no {}' prompts), not by a softmax.")
    add_option(parser, "--negative-templates", "--negative-template", "--negative_template", nargs="+",
               help="With --multi-label or --findings: the negative prompts, each with one {} (default: each "
                    "template with 'no {}').")
    add_model_options(parser)
    add_device_options(parser)
    add_batch_options(parser)
    add_output_options(parser, "Write metrics and per-image probabilities as JSON.")
    args = parser.parse_args(argv)
    if args.findings:
        if not args.table or len(args.table) != 1:
            parser.error("--findings: give the table of your own as one --table.")
        args.dataset, args.multi_label = [FINDINGS], True
    if args.negative_templates and not args.multi_label:
        parser.error("--negative-templates scores findings one by one: pass --multi-label (or --findings) too.")
    for option in ("data_root", "table"):
        values = getattr(args, option)
        if values is not None and len(values) not in (1, len(args.dataset)):
            parser.error(f"--{option.replace('_', '-')}: give one for all datasets or one per --dataset "
                         f"({len(args.dataset)}).")
    if args.bootstrap < 1:
        parser.error("--bootstrap: at least 1 resample.")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import time

    from .options import check_model_source, load_model, make_accelerator, model_dtype
    from ..evaluation.benchmarks import evaluate_benchmark, print_result
    from ..inference.malloc_tuning import keep_freed_memory_for_reuse
    from ..models.ace_lora.zero_shot import ZeroShotClassifier, checked_templates
    from ..outputs.safe_outputs import check_output_file, folder_lock, write_json_atomic

    keep_freed_memory_for_reuse()
    if args.output and args.output.suffix.lower() != ".json":
        raise InvalidArgumentError(f"--output {args.output}: the report is JSON; name a .json file.")
    if args.negative_templates:
        checked_templates(args.negative_templates)
    plans = read_plans(args)
    if args.output:
        check_output_file(args.output, [table for *_, table in plans], overwrite=args.overwrite)
    check_model_source(args)
    accelerator = make_accelerator(args.device)
    model, processor, _ = load_model(args, accelerator.device, model_dtype(args.dtype, accelerator.device))
    started, results = time.perf_counter(), {}
    for name, images, references, _ in plans:
        benchmark = chosen_benchmark(args, name)
        classifier = ZeroShotClassifier(model, processor, benchmark.templates, args.batch_size,
                                        args.num_workers, show_progress=True, accelerator=accelerator,
                                        negative_templates=args.negative_templates)
        results[name] = evaluate_benchmark(name, classifier, images, references, args.bootstrap, args.seed,
                                           benchmark)
        print_result(name, results[name])
    report = {"model": model_summary(args), "bootstrap": args.bootstrap, "seed": args.seed,
              "seconds": time.perf_counter() - started, "datasets": results}
    if args.output:
        with folder_lock(args.output):
            write_json_atomic(args.output, report)
        print(f"\nwrote {args.output}")
    return EXIT_INPUTS_SKIPPED if any(result["skipped"] for result in results.values()) else 0


def cli() -> None:
    """The `ace-lora-evaluate` console script."""
    run_cli(main)


__all__ = ["DATASETS", "DATASET_ALIASES", "FINDINGS", "chosen_benchmark", "cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
