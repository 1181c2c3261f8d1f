"""Image-report retrieval: rank the reports of a table for each of its images and the images for each report, and
report Recall@1/5/10 and the median rank in both directions, for the ACE and the plain (`use_hgnn=False`) embeddings.

    ace-lora-retrieval --table mimic/mimic_cxr.csv --split test --image-root mimic-cxr-jpg/2.1.0/ --output retrieval.json
    python examples/retrieval_eval.py --table pairs.jsonl --model my-ace-lora/

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
import hashlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers.utils import logging

from ..models.ace_lora.batch_inference import embed_images
from ..cli.classify import add_model_arguments, model_dtype
from ..cli.common import EXIT_INPUTS_SKIPPED, run_cli
from ..errors import DataFormatError, ImageLoadError
from ..inference.malloc_tuning import keep_freed_memory_for_reuse
from ..sources.folders import load_model_and_processor
from ..models.ace_lora.modeling_ace_lora import AceLoraModel, AceLoraTokenFeatures
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from ..outputs.safe_outputs import (
    atomic_file,
    check_output_file,
    ensure_folder,
    write_text_atomic,
)
from ..data.tables import read_table_rows

logger = logging.get_logger(__name__)

RECALL_AT = (1, 5, 10)
# The embeddings compared, by the `use_hgnn` of `pool` that gives them.
POOLINGS = {"ace": True, "plain": False}
MATCHES = ("report-text", "pair")
CACHE_FORMAT = 1
QUERY_CHUNK = 1024  # queries ranked at a time: a chunk of the similarity matrix, not all of it


# ------------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class TableColumns:
    """Which columns hold what; the defaults are those of dataset_prep/mimic_cxr.py's table."""

    image: str = "image"
    report: str = "report"
    split: str = "split"


@dataclass
class RetrievalPairs:
    """The image-report pairs of a table, in its order."""

    images: list[str]  # image paths, joined to the image root
    reports: list[str]  # report texts, whitespace collapsed
    lines: list[int]  # the line of the table each pair starts on (for messages)


def read_pairs(
    table: Path, image_root: Path | None = None, columns: TableColumns = TableColumns(), split: str | None = None
) -> RetrievalPairs:
    """The pairs of `table` (of rows whose split column is `split`, if given). A missing column, an empty image path or
    report, or a file that is not UTF-8 is a `DataFormatError` naming the file, line, column and value."""
    wanted = [columns.image, columns.report] + ([columns.split] if split is not None else [])
    root = image_root if image_root is not None else table.parent
    pairs, splits_seen = RetrievalPairs([], [], []), set()
    rows = read_table_rows(table, wanted, "an image-report table",
                           "Name yours with --image-column / --report-column / --split-column.")
    for row in rows:
        if split is not None:
            splits_seen.add(row.cells[columns.split].strip())
            if row.cells[columns.split].strip() != split:
                continue
        pairs.images.append(str(root / row.text(columns.image, "an image path")))
        pairs.reports.append(" ".join(row.text(columns.report, "the report text").split()))
        pairs.lines.append(row.line)
    if not pairs.images:
        where = f" with {columns.split} = {split!r} (found {sorted(splits_seen)}); check --split" if split else ""
        raise DataFormatError(f"{table}: no image-report pairs{where}.")
    return pairs


def distinct_texts(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in order of first appearance, and the index of each text among them."""
    index: dict[str, int] = {}
    ids = [index.setdefault(text, len(index)) for text in texts]
    return list(index), torch.tensor(ids)


# ------------------------------------------------------------------------------------------------- embeddings


@dataclass
class TableEmbeddings:
    """The ACE and plain embeddings of a table's images and of its distinct report texts (`[n, 2, D]`, ACE first)."""

    image_index: torch.Tensor  # [n]: the pairs whose image was embedded
    images: torch.Tensor  # [n, 2, D]
    reports: torch.Tensor  # [m, 2, D], one per distinct report text
    failures: list[tuple[int, str]]  # the pairs whose image could not be read, and why


def pooled_embeddings(tower, features: AceLoraTokenFeatures) -> torch.Tensor:
    """`[B, 2, D]`: the ACE and the plain embedding of one forward's token features."""
    return torch.stack([tower.pool(features, use_hgnn) for use_hgnn in POOLINGS.values()], dim=1)


def embed_table_images(model: AceLoraModel, processor: AceLoraProcessor, images: Sequence[str], batch_size: int,
                       num_workers: int | None, device: torch.device,
                       show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """`(image_index, [n, 2, D] embeddings, failures)` of `images`, decoded in `num_workers` DataLoader workers."""
    tower = model.vision_model
    batches = list(embed_images(lambda pixels: pooled_embeddings(tower, tower.get_token_features(pixels)), images,
                                processor.image_processor, batch_size, num_workers, device,
                                show_progress=show_progress))
    embedded = [batch.embeddings for batch in batches if batch.indices]
    empty = torch.empty(0, len(POOLINGS), model.config.projection_dim)
    return (torch.tensor([index for batch in batches for index in batch.indices], dtype=torch.long),
            torch.cat(embedded) if embedded else empty,
            [failure for batch in batches for failure in batch.failures])


@torch.no_grad()
def embed_texts(model: AceLoraModel, processor: AceLoraProcessor, texts: Sequence[str], batch_size: int,
                device: torch.device, show_progress: bool = False) -> torch.Tensor:
    """`[m, 2, D]`: the ACE and plain embeddings of `texts`, tokenised by the processor in batches."""
    tower, parts = model.text_model, []
    with tqdm(total=len(texts), unit="report", desc="reports", disable=not show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            tokens = processor(text=list(texts[start : start + batch_size]), return_tensors="pt")
            features = tower.get_token_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            parts.append(pooled_embeddings(tower, features).float().cpu())
            bar.update(len(parts[-1]))
    return torch.cat(parts)


def model_fingerprint(model: AceLoraModel, processor: AceLoraProcessor) -> str:
    """sha256 of what embeddings depend on besides their inputs: the weights (and their dtype) as loaded, the
    config, the image preprocessing and the tokenizer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy())
    for text in (model.config.to_json_string(), processor.image_processor.to_json_string(),
                 processor.tokenizer.backend_tokenizer.to_str()):
        digest.update(text.encode())
    return digest.hexdigest()


def file_fingerprint(path: str) -> list:
    """`[path, size, mtime_ns]` of a file, with `None`s where it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def embeddings_description(model_sha256: str, device: torch.device, images: Sequence[str],
                           reports: Sequence[str]) -> dict:
    """What a table's embeddings are computed from; the cache uses an entry only when this matches in full."""
    return {
        "format": CACHE_FORMAT,
        "model_sha256": model_sha256,
        "device": device.type,
        "images": [file_fingerprint(image) for image in images],
        "reports_sha256": hashlib.sha256(json.dumps(list(reports)).encode()).hexdigest(),
    }


def default_cache_dir() -> Path:
    return Path(constants.HF_HOME) / "ace-lora-hf" / "retrieval"


@dataclass
class EmbeddingCache:
    """One entry of the embedding cache: `KEY.safetensors` and `KEY.json` (what they were computed from and which
    images failed), KEY being a hash of that description. The JSON is written last, so an interrupted write leaves
    no entry."""

    folder: Path
    description: dict

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def tensors_path(self) -> Path:
        return self.folder / f"{self.key}.safetensors"

    @property
    def description_path(self) -> Path:
        return self.folder / f"{self.key}.json"

    def load(self) -> TableEmbeddings | None:
        """The cached embeddings, or None when there are none for exactly this description (or they are damaged)."""
        try:
            saved = json.loads(self.description_path.read_text(encoding="utf-8"))
            tensors = load_file(self.tensors_path)
        except (OSError, ValueError, SafetensorError):
            return None
        if saved.get("computed_from") != self.description:
            logger.warning("%s was computed from other inputs; computing the embeddings again.", self.tensors_path)
            return None
        return TableEmbeddings(tensors["image_index"], tensors["images"], tensors["reports"],
                               [tuple(failure) for failure in saved["failures"]])

    def save(self, embeddings: TableEmbeddings) -> None:
        ensure_folder(self.folder, "--cache-dir")
        tensors = {"image_index": embeddings.image_index, "images": embeddings.images, "reports": embeddings.reports}
        with atomic_file(self.tensors_path, "wb") as file:
            file.write(save({name: tensor.contiguous() for name, tensor in tensors.items()}))
        write_text_atomic(self.description_path, json.dumps(
            {"computed_from": self.description, "failures": embeddings.failures}, indent=1))


def table_embeddings(model: AceLoraModel, processor: AceLoraProcessor, images: Sequence[str], reports: Sequence[str],
                     cache_dir: Path, batch_size: int, num_workers: int | None, device: torch.device,
                     show_progress: bool = False) -> tuple[TableEmbeddings, Path, bool]:
    """The embeddings of `images` and of the (distinct) `reports`: from the cache when it holds them for exactly these
    inputs and this model, else computed and kept there. Returns them, the cache file and whether it was reused."""
    cache = EmbeddingCache(cache_dir, embeddings_description(model_fingerprint(model, processor), device, images,
                                                             reports))
    embeddings = cache.load()
    if embeddings is not None:
        return embeddings, cache.tensors_path, True
    image_index, image_embeddings, failures = embed_table_images(model, processor, images, batch_size, num_workers,
                                                                 device, show_progress)
    report_embeddings = embed_texts(model, processor, reports, batch_size, device, show_progress)
    embeddings = TableEmbeddings(image_index, image_embeddings, report_embeddings, failures)
    cache.save(embeddings)
    return embeddings, cache.tensors_path, False


# ---------------------------------------------------------------------------------------------------- metrics


def retrieval_ranks(similarity: torch.Tensor, query_groups: torch.Tensor, candidate_groups: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best-scoring correct candidate.

    Args:
        similarity: `[Q, C]` scores of every candidate for every query.
        query_groups, candidate_groups: `[Q]` and `[C]`; a candidate is correct for a query of the same group. Every
            query needs at least one.

    Returns:
        `[Q]`: 1 + the number of wrong candidates scoring at least as high as the query's best correct one (a tie
        counts against the query).
    """
    correct = query_groups[:, None] == candidate_groups[None, :]
    best = similarity.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((similarity >= best) & ~correct).sum(dim=1)


def ranks_between(queries: torch.Tensor, candidates: torch.Tensor, query_groups: torch.Tensor,
                  candidate_groups: torch.Tensor) -> torch.Tensor:
    """`retrieval_ranks` of the cosine similarities of L2-normalised embeddings, a chunk of queries at a time."""
    return torch.cat([
        retrieval_ranks(queries[start : start + QUERY_CHUNK] @ candidates.t(),
                        query_groups[start : start + QUERY_CHUNK], candidate_groups)
        for start in range(0, len(queries), QUERY_CHUNK)
    ])


def rank_metrics(ranks: torch.Tensor, recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@K (the share of queries ranked K or better) and the median rank."""
    metrics = {f"recall@{k}": (ranks <= k).double().mean().item() for k in recall_at}
    metrics["median_rank"] = float(statistics.median(ranks.tolist()))
    return metrics


def retrieval_metrics(images: torch.Tensor, reports: torch.Tensor, groups: torch.Tensor) -> dict[str, dict]:
    """Both directions for `[n, D]` image and report embeddings of n pairs; pairs of the same group match."""
    return {"image_to_report": rank_metrics(ranks_between(images, reports, groups, groups)),
            "report_to_image": rank_metrics(ranks_between(reports, images, groups, groups))}


def evaluate(embeddings: TableEmbeddings, report_ids: torch.Tensor, match: str) -> dict[str, dict]:
    """The metrics of each pooling over the pairs whose image was embedded."""
    pair_reports = report_ids[embeddings.image_index]
    groups = pair_reports if match == "report-text" else torch.arange(len(pair_reports))
    return {name: retrieval_metrics(embeddings.images[:, which], embeddings.reports[pair_reports, which], groups)
            for which, name in enumerate(POOLINGS)}


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, required=True,
                        help="CSV or JSON Lines table (optionally .gz) with an image path and a report per row.")
    parser.add_argument("--image-root", type=Path, help="Folder the image paths are relative to (default: the table's).")
    parser.add_argument("--image-column", default=TableColumns.image, help="Default: %(default)s.")
    parser.add_argument("--report-column", default=TableColumns.report, help="Default: %(default)s.")
    parser.add_argument("--split-column", default=TableColumns.split, help="Default: %(default)s.")
    parser.add_argument("--split", help="Evaluate only the rows whose split column holds this (e.g. test).")
    parser.add_argument("--match", choices=MATCHES, default=MATCHES[0],
                        help="report-text: any report identical to the pair's own is correct (default); pair: only "
                             "the pair's own.")
    add_model_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="Where embeddings are kept for later runs (default: %(default)s).")
    parser.add_argument("--output", type=Path, help="Write the metrics (and the skipped images) to this JSON file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output (never an input).")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace, pairs: RetrievalPairs) -> dict:
    """Embed (or reuse) and evaluate; returns the summary that is printed and written."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    model, processor = load_model_and_processor(args.model, device=device, dtype=model_dtype(args.dtype, device),
                                                revision=args.revision, biomedclip=args.biomedclip,
                                                adapters=args.adapters)
    reports, report_ids = distinct_texts(pairs.reports)
    embeddings, cache_file, reused = table_embeddings(model, processor, pairs.images, reports, args.cache_dir,
                                                      args.batch_size, args.num_workers, device, show_progress=True)
    if not len(embeddings.image_index):
        raise ImageLoadError(str(args.table), f"none of its {len(pairs.images)} images could be read (the first: "
                                              f"{embeddings.failures[0][1]}); check --image-root")
    return {
        "table": str(args.table), "split": args.split,
        "model": args.model or f"released ({args.biomedclip} + {args.adapters})",
        "match": args.match, "pairs": len(embeddings.image_index),
        "distinct_reports": len(report_ids[embeddings.image_index].unique()),
        "metrics": evaluate(embeddings, report_ids, args.match),
        "skipped": [{"line": pairs.lines[index], "image": pairs.images[index], "error": reason}
                    for index, reason in embeddings.failures],
        "embeddings": {"file": str(cache_file), "reused": reused},
        "seconds": time.perf_counter() - started,
    }


def print_summary(summary: dict) -> None:
    match = "any identical report text" if summary["match"] == "report-text" else "the pair's own"
    print(f"\n{summary['pairs']} image-report pairs, {summary['distinct_reports']} distinct reports; correct: {match}")
    cells = [f"R@{k}" for k in RECALL_AT] + ["median"]
    width = 8 * len(cells)
    print(f"{'':10}{'image -> report':^{width}}  {'report -> image':^{width}}")
    print(f"{'':10}" + "".join(f"{cell:>8}" for cell in cells) + "  " + "".join(f"{cell:>8}" for cell in cells))
    for name, directions in summary["metrics"].items():
        row = []
        for metrics in directions.values():
            row += [f"{100 * metrics[f'recall@{k}']:7.1f}%" for k in RECALL_AT] + [f"{metrics['median_rank']:8g}"]
        print(f"{name:10}" + "".join(row[: len(cells)]) + "  " + "".join(row[len(cells) :]))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} image(s), their pairs left out:")
        for entry in summary["skipped"]:
            print(f"  line {entry['line']}: {entry['image']}: {entry['error']}")
    verb = "reused from" if summary["embeddings"]["reused"] else "computed and kept in"
    print(f"embeddings {verb} {summary['embeddings']['file']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory_for_reuse()
    pairs = read_pairs(args.table, args.image_root, TableColumns(args.image_column, args.report_column,
                                                                 args.split_column), args.split)
    if args.output:
        check_output_file(args.output, [args.table], overwrite=args.overwrite)
    ensure_folder(args.cache_dir, "--cache-dir")
    summary = run(args, pairs)
    print_summary(summary)
    if args.output:
        write_text_atomic(args.output, json.dumps(summary, indent=2))
        print(f"wrote {args.output}")
    return EXIT_INPUTS_SKIPPED if summary["skipped"] else 0


def cli() -> None:
    """The `ace-lora-retrieval` console script."""
    run_cli(main)


__all__ = ["RetrievalPairs", "TableColumns", "TableEmbeddings", "cli", "evaluate", "main", "rank_metrics",
           "read_pairs", "retrieval_ranks", "table_embeddings"]


if __name__ == "__main__":
    cli()
