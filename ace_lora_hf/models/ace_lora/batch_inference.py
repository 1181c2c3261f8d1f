"""Images through the model in batches: decoded and preprocessed in DataLoader workers beside the model, an unreadable
file reported rather than fatal, and, under `accelerate launch`, each process on its shard with the results gathered
back in input order."""

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import ImageLoadError, InvalidArgumentError
from .image_loading import load_image


ImageInput = str | Path | bytes | Image.Image
# Tokens per model call in eager CPU inference (see `in_cpu_chunks`).
CPU_CHUNK_TOKENS = 1024


@dataclass
class ImageBatch:
    """Preprocessed pixels of the images of a batch that loaded, and why the others did not (index, reason)."""

    indices: list[int]
    pixel_values: torch.Tensor | None
    failures: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class EmbeddedBatch:
    """Per batch, in input order: which inputs were embedded, their embeddings, and the inputs that failed."""

    indices: list[int]
    embeddings: torch.Tensor
    failures: list[tuple[int, str]]


def cpu_chunks(batch_size: int, tokens_per_sample: int, device: torch.device) -> int:
    """How many calls a batch takes: one, except in eager CPU inference (see `in_cpu_chunks`)."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if torch.is_grad_enabled() or device.type != "cpu" or tracing:
        return 1
    return math.ceil(batch_size * tokens_per_sample / max(CPU_CHUNK_TOKENS, tokens_per_sample))


def in_cpu_chunks(embed: Callable[..., torch.Tensor], *inputs: torch.Tensor, tokens_per_sample: int) -> torch.Tensor:
    """`embed(*inputs)` for a batch whose samples are embedded independently (images, or classes with their prompts),
    run on the CPU without gradients in equal chunks of at most about `CPU_CHUNK_TOKENS` tokens and concatenated.

    On the CPU the activations of a large batch exceed glibc's mmap threshold, so that every allocation page-faults;
    chunks keep the matrix products near peak and the results equal. With gradients, on other devices, and in
    compiled or exported graphs (whose batch size stays free) it is one call.
    """
    chunks = cpu_chunks(len(inputs[0]), tokens_per_sample, inputs[0].device)
    if chunks == 1:
        return embed(*inputs)
    return torch.cat([embed(*parts) for parts in zip(*(tensor.tensor_split(chunks) for tensor in inputs))])


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(device: torch.device | str) -> int:
    """Decoding workers beside a model on `device`. Beside a GPU: one per CPU left after the main process, at most 8.
    Beside a model on the CPU: none. Its matrix products already use every core, decoding costs about 5% of its time
    per image, and a worker taking a core from them cost 15% end to end (`benchmarks/bench_pipeline.py`, 2 cores)."""
    return 0 if torch.device(device).type == "cpu" else min(8, available_cpus() - 1)


class ImageFiles(Dataset):
    """Images (paths, bytes or PIL images) loaded and preprocessed one at a time, in a worker when there is one."""

    def __init__(self, images: Sequence[ImageInput], image_processor):
        self.images, self.image_processor = images, image_processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.images[index])
        except ImageLoadError as error:
            return index, None, error.reason
        return index, self.image_processor(image, return_tensors="pt")["pixel_values"][0], None


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    loaded = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return ImageBatch(
        indices=[index for index, _ in loaded],
        pixel_values=torch.stack([pixels for _, pixels in loaded]) if loaded else None,
        failures=[(index, error) for index, _, error in items if error is not None],
    )


def _single_thread_worker(worker_id: int) -> None:
    # Workers decode one image at a time; intra-op threads would only compete with the model for the cores.
    torch.set_num_threads(1)


def image_loader(images: Sequence[ImageInput], image_processor, batch_size: int, num_workers: int,
                 pin_memory: bool = False) -> DataLoader:
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size}: must be at least 1.")
    if num_workers < 0:
        raise InvalidArgumentError(f"num_workers={num_workers}: must be 0 (decode in the main process) or more.")
    return DataLoader(ImageFiles(images, image_processor), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_images, pin_memory=pin_memory, worker_init_fn=_single_thread_worker,
                      persistent_workers=False)


def embed_images(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[ImageInput],
    image_processor,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
    accelerator=None,
    show_progress: bool = False,
) -> Iterator[EmbeddedBatch]:
    """`embed(pixel_values)` of every image, batch by batch in input order, decoded in `num_workers` DataLoader workers
    (None: `default_num_workers(device)`).

    With an `accelerate.Accelerator` of several processes, each process embeds its shard of the batches and every
    process receives the gathered batches in input order.
    """
    device = torch.device(device)
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    loader = image_loader(images, image_processor, batch_size, num_workers, pin_memory=device.type == "cuda")
    if accelerator is not None and accelerator.num_processes > 1:
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
    seen: set[int] = set()
    with tqdm(total=len(images), unit="img", desc="images", disable=not show_progress) as bar:
        for batch in loader:
            embedded = _embed_batch(embed, batch, device)
            if accelerator is not None and accelerator.num_processes > 1:
                embedded = _gathered(accelerator, embedded, seen)
            bar.update(len(embedded.indices) + len(embedded.failures))
            yield embedded


@torch.no_grad()
def _embed_batch(
    embed: Callable[[torch.Tensor], torch.Tensor], batch: ImageBatch, device: torch.device
) -> EmbeddedBatch:
    if batch.pixel_values is None:
        return EmbeddedBatch([], torch.empty(0), batch.failures)
    embeddings = embed(batch.pixel_values.to(device, non_blocking=True)).float().cpu()
    return EmbeddedBatch(batch.indices, embeddings, batch.failures)


def _gathered(accelerator, embedded: EmbeddedBatch, seen: set[int]) -> EmbeddedBatch:
    """Every process's batch of this step, in input order, without the items the last step repeats to even out."""
    rows = [(index, embedding) for index, embedding in zip(embedded.indices, embedded.embeddings)]
    parts = gather_object([(rows, embedded.failures)])
    rows = sorted({index: row for part_rows, _ in parts for index, row in part_rows if index not in seen}.items())
    failures = sorted({index: error for _, part_failures in parts for index, error in part_failures
                       if index not in seen}.items())
    seen.update(index for index, _ in rows)
    seen.update(index for index, _ in failures)
    return EmbeddedBatch([index for index, _ in rows],
                         torch.stack([row for _, row in rows]) if rows else torch.empty(0), failures)


__all__ = ["CPU_CHUNK_TOKENS", "EmbeddedBatch", "ImageBatch", "ImageFiles", "cpu_chunks", "default_num_workers",
           "embed_images", "image_loader", "in_cpu_chunks"]
