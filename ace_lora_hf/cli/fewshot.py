"""Few-shot adaptation: K labelled images per class (or a share of a training table), several seeds, results as
mean +- standard deviation per method and K.

    ace-lora-fewshot --train-table train.csv --test-table test.csv --output fewshot/
    ace-lora-fewshot --train-table train.csv --test-table test.csv --train-fraction 0.01 0.1 1.0 --output fewshot/
    ace-lora-fewshot --train-table prepared/ --test-table prepared/ --labels "No Finding" Pneumonia --output fewshot/

Tables are CSV or JSON Lines with an image path (--image-column, default Path, relative to --image-root, default each
table's folder) and a class name (--label-column, default Label); the class names are also the prompts' labels.
Either table may instead be a prepared set (the folder `ace-lora-prepare training-set` writes, prepared with this
model's --model): its images are read as stored, one split (--train-split, default train; --test-split, default test,
else validation), and its classes are its 0/1 label columns (--labels picks and orders them; default all). A row
counts for the one class whose column holds 1; rows with none of them at 1, or several, are left out and counted.
Methods: zero-shot (the K = 0 baseline); a linear probe (logistic regression) on the frozen image embeddings, its C
chosen by 4-fold cross-validation on the shots where every class has at least 4, 1.0 below that (recorded in the
table); and a classifier head initialised from the class-prompt embeddings, trained on the shots with the image
tower's LoRA adapters (base weights frozen). Shots are drawn per class by the seed, nested as K grows. --output
receives results.csv and results.json (mean and std over seeds; the JSON also every seed's numbers), results.png
(metric against K; needs matplotlib) and shots.csv (the images drawn for each K and seed, with their table line; a
prepared set's are named split[row]).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from .common import run_cli
from .options import (add_batch_options, add_device_options, add_model_options, add_option, add_output_options,
                      check_paths_exist, command_parser, model_summary, positive_int)
from ..errors import InvalidArgumentError


METHODS = ("zero-shot", "linear-probe", "prompt-head")  # as ace_lora_hf.fewshot.runner.METHODS (no torch for --help)
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
IMAGE_COLUMN, LABEL_COLUMN = "Path", "Label"


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of the training table above 0 and at most 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-fewshot", __doc__)
    data = parser.add_argument_group("data")
    add_option(data, "--train-table", type=Path, required=True,
               help="Labelled images the shots are drawn from: a table or a prepared set.")
    add_option(data, "--test-table", type=Path, required=True,
               help="Labelled images every method is scored on: a table or a prepared set.")
    add_option(data, "--train-split", help="Split of a prepared --train-table (default: train).")
    add_option(data, "--test-split", help="Split of a prepared --test-table (default: test, else validation).")
    add_option(data, "--image-root", type=Path, help="Folder a table's image paths are relative to (default: the "
                                                     "table's).")
    add_option(data, "--image-column", help=f"A table's column of image paths (default: {IMAGE_COLUMN}).")
    add_option(data, "--label-column", help=f"A table's column of class names (default: {LABEL_COLUMN}).")
    add_option(data, "--labels", nargs="+", help="The classes, in this order (default: the train table's, sorted; a "
                                                 "prepared set's label columns).")
    add_option(data, "--templates", nargs="+", help="Prompt templates with one {} (default: the paper's two).")
    protocol = parser.add_argument_group("protocol")
    sizes = protocol.add_mutually_exclusive_group()
    add_option(sizes, "--shots", nargs="+", type=positive_int, help="Images per class, K (default: 1 2 4 8 16).")
    add_option(sizes, "--train-fraction", nargs="+", type=share, help="Shares of each class of the train table.")
    add_option(protocol, "--seeds", nargs="+", type=int, default=[1, 2, 3], help="Seeds (default: %(default)s).")
    add_option(protocol, "--methods", nargs="+", choices=METHODS, default=list(METHODS),
               help="Methods (default: all).")
    add_option(protocol, "--steps", type=int, default=50, help="Training steps of the prompt head (default: "
                                                               "%(default)s).")
    add_option(protocol, "--learning-rate", type=float, default=1e-3, help="Its AdamW learning rate (default: "
                                                                           "%(default)s).")
    add_option(protocol, "--plot-metric", choices=("accuracy", "auc"), default="accuracy",
               help="Metric of results.png (default: %(default)s).")
    add_model_options(parser)
    add_device_options(parser, dtype=False)
    add_batch_options(parser)
    add_output_options(parser, "Folder of the results and the shots.", required=True)
    args = parser.parse_args(argv)
    if args.steps < 0 or not args.learning_rate > 0:
        parser.error("--steps: 0 or more; --learning-rate: above 0.")
    repeated = [label for index, label in enumerate(args.labels or []) if label in args.labels[:index]]
    if repeated:
        parser.error(f"--labels: {repeated[0]!r} is given twice; name each class once.")
    if args.shots is None and args.train_fraction is None:
        args.shots = list(DEFAULT_SHOTS)
    return args


def is_prepared_set(path: Path, option: str) -> bool:
    """True for a folder `ace-lora-prepare training-set` wrote, False for a table; any other folder is refused."""
    if not path.is_dir():
        return False
    from ..data.prepared import PREPARED_INFO, read_prepared_info

    if read_prepared_info(path) is None:
        raise InvalidArgumentError(f"{option} {path}: a folder without {PREPARED_INFO}; give a CSV or JSON Lines table "
                                   "or a set that ace-lora-prepare training-set wrote.")
    return True


def check_data_options(args: argparse.Namespace, train_prepared: bool, test_prepared: bool) -> None:
    """Refuse options that have nothing to apply to: a split of a table, a table's columns where both are sets."""
    for prepared, table, split, option in ((train_prepared, args.train_table, args.train_split, "--train-split"),
                                           (test_prepared, args.test_table, args.test_split, "--test-split")):
        if split is not None and not prepared:
            raise InvalidArgumentError(f"{option} {split}: {table} is a table, which has no splits; {option} chooses "
                                       "a split of a prepared set.")
    if not (train_prepared and test_prepared):
        return
    if args.label_column is not None:
        raise InvalidArgumentError(f"--label-column {args.label_column}: a prepared set has one 0/1 column per class; "
                                   "choose classes with --labels.")
    for option, value in (("--image-column", args.image_column), ("--image-root", args.image_root)):
        if value is not None:
            raise InvalidArgumentError(f"{option} {value}: a prepared set holds its images; {option} applies to the "
                                       "image paths of a CSV or JSON Lines table.")


def chosen_splits(args: argparse.Namespace, train_prepared: bool, test_prepared: bool) -> tuple[str | None, str | None]:
    """The splits of the prepared sets (None for a table); one split of one set as both is refused."""
    from ..fewshot.prepared_sets import default_test_split, prepared_splits

    train_split = (args.train_split or "train") if train_prepared else None
    test_split = (args.test_split or default_test_split(prepared_splits(args.test_table))) if test_prepared else None
    if train_prepared and test_prepared and train_split == test_split and \
            args.train_table.resolve() == args.test_table.resolve():
        raise InvalidArgumentError(f"--train-table and --test-table are both split {train_split!r} of "
                                   f"{args.test_table}: the test images would be among the shots; choose another "
                                   "split with --test-split or --train-split.")
    return train_split, test_split


def read_labelled(args: argparse.Namespace, path: Path, split: str | None, classes: Sequence[str] | None,
                  option: str):
    """The labelled images of a table (`split` None) or of a prepared set's split, whose rows left out are printed."""
    from ..fewshot.prepared_sets import read_prepared_set
    from ..fewshot.sampling import read_labelled_table

    if split is None:
        return read_labelled_table(path, args.image_column or IMAGE_COLUMN, args.label_column or LABEL_COLUMN,
                                   args.image_root, classes, option)
    images, left_out = read_prepared_set(path, split, classes, option, option.replace("-table", "-split"))
    print(f"{option} {path}, split {split}: {len(images.names)} rows with one class"
          + (f"; left out {left_out.no_positive} with none of {list(images.classes)} at 1 and "
             f"{left_out.several_positives} with several" if left_out.total else ""))
    return images


def read_tables(args: argparse.Namespace):
    """The training pool and the test set (tables or prepared sets), checked (a class with fewer images than K named)
    before the model loads."""
    from ..fewshot.sampling import check_classes

    check_paths_exist([args.train_table], "--train-table", "table or prepared set")
    check_paths_exist([args.test_table], "--test-table", "table or prepared set")
    check_paths_exist([args.image_root], "--image-root", "folder")
    train_prepared = is_prepared_set(args.train_table, "--train-table")
    test_prepared = is_prepared_set(args.test_table, "--test-table")
    check_data_options(args, train_prepared, test_prepared)
    train_split, test_split = chosen_splits(args, train_prepared, test_prepared)
    pool = read_labelled(args, args.train_table, train_split, args.labels, "--train-table")
    if len(pool.classes) < 2:
        raise InvalidArgumentError(f"--train-table {args.train_table}: one class ({pool.classes[0]!r}); few-shot "
                                   "classification needs two or more.")
    check_classes(pool, args.shots or [1])
    test = read_labelled(args, args.test_table, test_split, pool.classes, "--test-table")
    check_classes(test, [1])  # a class without a test image has no AUC
    if train_prepared and test_prepared:
        from ..fewshot.prepared_sets import check_apart

        warning = check_apart(pool, test)
        if warning:
            print(f"warning: {warning}")
    return pool, test


def check_prepared_processors(args: argparse.Namespace, image_processor) -> None:
    """Refuse a prepared set made for another model's image size: its pixels would not be its files'."""
    from ..data.prepared import check_processor_settings, read_prepared_info

    for path, option in ((args.train_table, "--train-table"), (args.test_table, "--test-table")):
        info = read_prepared_info(path) if path.is_dir() else None
        if info is not None:
            check_processor_settings(info, image_processor, f"{option} {path}", f"--model {model_summary(args)}")


def plan_of(args: argparse.Namespace):
    from ..fewshot.prompt_classifier import HeadTraining
    from ..fewshot.runner import FewShotPlan
    from ..models.ace_lora.zero_shot import CHEST_XRAY_TEMPLATES, checked_templates

    return FewShotPlan(shots=tuple(args.shots or ()), fractions=tuple(args.train_fraction or ()),
                       seeds=tuple(dict.fromkeys(args.seeds)), methods=tuple(dict.fromkeys(args.methods)),
                       templates=checked_templates(args.templates or CHEST_XRAY_TEMPLATES),
                       training=HeadTraining(args.steps, args.learning_rate, args.batch_size))


def printed(record: dict) -> str:
    setting = f"K={record['shots']}" if record["shots"] is not None else f"share={record['fraction']:g}"
    seed = "" if record["seed"] is None else f" seed {record['seed']}"
    probe = f"  (C={record['C']:g})" if "C" in record else ""
    return f"{record['method']:>12} {setting}{seed}: accuracy {record['accuracy']:.4f}  AUC {record['auc']:.4f}{probe}"


def plotting_available() -> bool:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .options import check_model_source, load_model, make_accelerator
    from ..fewshot.report import write_results
    from ..fewshot.runner import FewShotRunner
    from ..outputs.safe_outputs import atomic_folder, check_output_folder, folder_lock

    pool, test = read_tables(args)
    plan = plan_of(args)
    check_output_folder(args.output, [args.train_table, args.test_table], overwrite=args.overwrite)
    check_model_source(args)
    plot_metric = args.plot_metric if plotting_available() else None
    if plot_metric is None:
        print("matplotlib is not installed: no results.png (pip install 'ace-lora-hf[plot]').")
    accelerator = make_accelerator(args.device)
    model, processor, _ = load_model(args, accelerator.device, for_inference=False)
    check_prepared_processors(args, processor.image_processor)
    print(f"{len(pool.images)} training images, {len(test.images)} test images, classes {list(pool.classes)}")
    runner = FewShotRunner(model, processor, plan, args.batch_size, args.num_workers,
                           on_record=lambda record: print(printed(record), flush=True))
    results = runner.run(pool, test)
    run = {"model": model_summary(args), "train_table": str(args.train_table), "train_split": pool.split,
           "test_table": str(args.test_table), "test_split": test.split, "classes": list(pool.classes),
           "templates": list(plan.templates), "seeds": list(plan.seeds), "steps": args.steps,
           "learning_rate": args.learning_rate}
    with folder_lock(args.output), atomic_folder(args.output) as folder:
        write_results(folder, results, run, plot_metric)
    print(f"wrote {args.output}")
    return 0


def cli() -> None:
    """The `ace-lora-fewshot` console script."""
    run_cli(main)


__all__ = ["cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
