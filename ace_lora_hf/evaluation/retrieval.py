"""Image-report retrieval: the ranks of each image's reports and each report's images, Recall@K and the median rank,
for the ACE and the plain (`use_hgnn=False`) embeddings, and the cache that keeps the embeddings between runs.
`ace-lora-retrieval --help` (`ace_lora_hf.cli.retrieval`) says how ranks, ties and duplicate reports are counted.
"""

import hashlib
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers.utils import logging

from ..models.ace_lora.batch_inference import embed_images, in_cpu_chunks
from ..errors import DataFormatError
from ..models.ace_lora.modeling_ace_lora import AceLoraModel, AceLoraTokenFeatures
from ..models.ace_lora.processing_ace_lora import AceLoraProcessor
from ..outputs.safe_outputs import atomic_file, ensure_folder, write_text_atomic
from ..data.tables import read_table_rows

logger = logging.get_logger(__name__)

RECALL_AT = (1, 5, 10)
# The embeddings compared, by the `use_hgnn` of `pool` that gives them.
POOLINGS = {"ace": True, "plain": False}
MATCHES = ("report-text", "pair")
CACHE_FORMAT = 2  # 2: the tensors file names the description it belongs to
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
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return in_cpu_chunks(lambda chunk: pooled_embeddings(tower, tower.get_token_features(chunk)), pixels,
                             tokens_per_sample=model.config.vision_config.num_tokens)

    batches = list(embed_images(embed, images, processor.image_processor, batch_size, num_workers, device,
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
            input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            embeddings = in_cpu_chunks(lambda ids, mask: pooled_embeddings(tower, tower.get_token_features(ids, mask)),
                                       input_ids, attention_mask, tokens_per_sample=input_ids.shape[1])
            parts.append(embeddings.float().cpu())
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
        "distinct_reports": len(set(reports)),
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
            with safe_open(self.tensors_path, "pt") as file:
                belongs_to = (file.metadata() or {}).get("computed_from")
            tensors = load_file(self.tensors_path)
        except (OSError, ValueError, SafetensorError):
            return None
        if (saved.get("computed_from") != self.description or belongs_to != self.key
                or not self._fits(tensors, saved.get("failures"))):
            logger.warning("%s was computed from other inputs; computing the embeddings again.", self.tensors_path)
            return None
        return TableEmbeddings(tensors["image_index"], tensors["images"], tensors["reports"],
                               [tuple(failure) for failure in saved["failures"]])

    def _fits(self, tensors: dict[str, torch.Tensor], failures) -> bool:
        """Whether the tensors have this description's shape: a row per image that did not fail, a row per distinct
        report."""
        return (set(tensors) == {"image_index", "images", "reports"} and isinstance(failures, list)
                and len(tensors["image_index"]) == len(tensors["images"])
                == len(self.description["images"]) - len(failures)
                and len(tensors["reports"]) == self.description["distinct_reports"])

    def save(self, embeddings: TableEmbeddings) -> None:
        ensure_folder(self.folder, "--cache-dir")
        tensors = {"image_index": embeddings.image_index, "images": embeddings.images, "reports": embeddings.reports}
        with atomic_file(self.tensors_path, "wb") as file:
            file.write(save({name: tensor.contiguous() for name, tensor in tensors.items()},
                            metadata={"computed_from": self.key}))
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


def retrieval_ranks(similarity: torch.Tensor, query_groups: torch.Tensor,
                    candidate_groups: torch.Tensor) -> torch.Tensor:
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


__all__ = ["MATCHES", "RECALL_AT", "RetrievalPairs", "TableColumns", "TableEmbeddings", "default_cache_dir",
           "distinct_texts", "evaluate", "rank_metrics", "read_pairs", "retrieval_ranks", "table_embeddings"]
