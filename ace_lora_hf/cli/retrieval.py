"""Image-report retrieval: rank the reports of a table for each of its images and the images for each report, and
report Recall@1/5/10 and the median rank in both directions, for the ACE and the plain (`use_hgnn=False`) embeddings.

    ace-lora-retrieval --table mimic/mimic_cxr.csv --split test --image-root mimic-cxr-jpg/2.1.0/ \\
        --output retrieval.json
    python examples/retrieval_eval.py --table pairs.jsonl --model runs/ace/

The table is a CSV or JSON Lines file (optionally .gz) with an image path and a report per row; the defaults are the
columns of dataset_prep/mimic_cxr.py's mimic_cxr.csv (image, report, split). Image paths are relative to --image-root
(default: the table's folder). An image that cannot be read is reported and its pair left out (exit status 3).

Ground truth and ranks. With --match report-text (the default) a retrieved item is correct when its report text is the
query's own, after collapsing whitespace: MIMIC-CXR repeats reports such as "No acute cardiopulmonary process." for
many images, and no model can tell identical texts apart, so crediting only the pair's own copy would make their order
a coin toss. Where every report is unique this is the standard instance-level ground truth; --match pair counts only
the pair's own image or report (identical texts then tie, and a tie counts against the query). The rank of a query is
1 + the number of wrong candidates scoring at least as high as its best-scoring correct one (ties go against the
query, so a tie never flatters); Recall@K is the share of queries ranked K or better, the median rank is the median of
the ranks (the mean of the middle two for an even count).

Embeddings. One forward per batch gives both the ACE and the plain embedding (the tower's token features, pooled
twice); each distinct report text is embedded once. They are kept in --cache-dir (default HF_HOME/ace-lora-hf/retrieval)
as safetensors beside a JSON of what they were computed from: the model's fingerprint (weights, config, image
preprocessing, tokenizer), the device, every image path with its size and modification time, and the report texts. A
later run with the same inputs reuses them; any change computes them again.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..outputs.terminal import printable
from .common import EXIT_INPUTS_SKIPPED, run_cli
from .options import (add_batch_options, add_device_options, add_model_options, add_option, add_output_options,
                      check_paths_exist, command_parser, model_summary)


MATCHES = ("report-text", "pair")  # as ace_lora_hf.evaluation.retrieval.MATCHES (kept here: --help needs no torch)

if TYPE_CHECKING:
    from ..evaluation.retrieval import RetrievalPairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = command_parser("ace-lora-retrieval", __doc__)
    add_option(parser, "--table", type=Path, required=True,
               help="CSV or JSON Lines table (optionally .gz) with an image path and a report per row.")
    add_option(parser, "--image-root", type=Path, help="Folder the image paths are relative to (default: the table's).")
    add_option(parser, "--image-column", help="Default: image.")
    add_option(parser, "--report-column", help="Default: report.")
    add_option(parser, "--split-column", help="Default: split.")
    add_option(parser, "--split", help="Evaluate only the rows whose split column holds this (e.g. test).")
    add_option(parser, "--match", choices=MATCHES, default=MATCHES[0],
               help="report-text: any report identical to the pair's own is correct (default); pair: only the "
                    "pair's own.")
    add_model_options(parser)
    add_device_options(parser)
    add_batch_options(parser)
    add_option(parser, "--cache-dir", type=Path,
               help="Where embeddings are kept for later runs (default: HF_HOME/ace-lora-hf/retrieval).")
    add_output_options(parser, "Write the metrics (and the skipped images) to this JSON file.")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, pairs: "RetrievalPairs") -> dict:
    """Embed (or reuse) and evaluate; returns the summary that is printed and written."""
    import time

    from .options import load_model, model_dtype, resolve_device
    from ..errors import ImageLoadError
    from ..evaluation.retrieval import distinct_texts, evaluate, table_embeddings

    started = time.perf_counter()
    device = resolve_device(args.device)
    model, processor, _ = load_model(args, device, model_dtype(args.dtype, device))
    reports, report_ids = distinct_texts(pairs.reports)
    embeddings, cache_file, reused = table_embeddings(model, processor, pairs.images, reports, args.cache_dir,
                                                      args.batch_size, args.num_workers, device, show_progress=True)
    if not len(embeddings.image_index):
        raise ImageLoadError(str(args.table), f"none of its {len(pairs.images)} images could be read (the first: "
                                              f"{embeddings.failures[0][1]}); check --image-root")
    return {
        "table": str(args.table), "split": args.split, "model": model_summary(args),
        "match": args.match, "pairs": len(embeddings.image_index),
        "distinct_reports": len(report_ids[embeddings.image_index].unique()),
        "metrics": evaluate(embeddings, report_ids, args.match),
        "skipped": [{"line": pairs.lines[index], "image": pairs.images[index], "error": reason}
                    for index, reason in embeddings.failures],
        "embeddings": {"file": str(cache_file), "reused": reused},
        "seconds": time.perf_counter() - started,
    }


def read_table(args: argparse.Namespace) -> "RetrievalPairs":
    """The table's pairs, read and checked (with every path named on the command line) before the model loads."""
    from ..evaluation.retrieval import TableColumns, read_pairs

    check_paths_exist([args.table], "--table", "file")
    check_paths_exist([args.image_root], "--image-root", "folder")
    columns = {field: value for field, value in (("image", args.image_column), ("report", args.report_column),
                                                 ("split", args.split_column)) if value is not None}
    return read_pairs(args.table, args.image_root, TableColumns(**columns), args.split)


def print_summary(summary: dict) -> None:
    match = "any identical report text" if summary["match"] == "report-text" else "the pair's own"
    print(f"\n{summary['pairs']} image-report pairs, {summary['distinct_reports']} distinct reports; correct: {match}")
    recall_at = [key.removeprefix("recall@") for key in next(iter(summary["metrics"].values()))["image_to_report"]
                 if key.startswith("recall@")]
    cells = [f"R@{k}" for k in recall_at] + ["median"]
    width = 8 * len(cells)
    print(f"{'':10}{'image -> report':^{width}}  {'report -> image':^{width}}")
    print(f"{'':10}" + "".join(f"{cell:>8}" for cell in cells) + "  " + "".join(f"{cell:>8}" for cell in cells))
    for name, directions in summary["metrics"].items():
        row = []
        for metrics in directions.values():
            row += [f"{100 * metrics[f'recall@{k}']:7.1f}%" for k in recall_at] + [f"{metrics['median_rank']:8g}"]
        print(f"{name:10}" + "".join(row[: len(cells)]) + "  " + "".join(row[len(cells) :]))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} image(s), their pairs left out:")
        for entry in summary["skipped"]:
            print(f"  line {entry['line']}: {printable(entry['image'])}: {printable(entry['error'])}")
    verb = "reused from" if summary["embeddings"]["reused"] else "computed and kept in"
    print(f"embeddings {verb} {summary['embeddings']['file']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import json

    from .options import check_model_source
    from ..evaluation.retrieval import default_cache_dir
    from ..inference.malloc_tuning import keep_freed_memory_for_reuse
    from ..outputs.safe_outputs import check_output_file, ensure_folder, write_text_atomic

    keep_freed_memory_for_reuse()
    pairs = read_table(args)
    if args.output:
        check_output_file(args.output, [args.table, *pairs.images], overwrite=args.overwrite)
    args.cache_dir = args.cache_dir or default_cache_dir()
    ensure_folder(args.cache_dir, "--cache-dir")
    check_model_source(args)
    summary = run(args, pairs)
    print_summary(summary)
    if args.output:
        write_text_atomic(args.output, json.dumps(summary, indent=2))
        print(f"wrote {args.output}")
    return EXIT_INPUTS_SKIPPED if summary["skipped"] else 0


def cli() -> None:
    """The `ace-lora-retrieval` console script."""
    run_cli(main)


__all__ = ["MATCHES", "cli", "main", "parse_args"]


if __name__ == "__main__":
    cli()
