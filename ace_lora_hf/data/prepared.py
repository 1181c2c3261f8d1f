"""A prepared training set: every image of an image-report table decoded, resized and center-cropped once, by the
model's image processor, and stored losslessly, so that training reads small PNGs instead of decoding
full-resolution X-rays in every epoch.

The processor turns a file into `pixel_values` in two parts: `load_image` gives an 8-bit image (mode "L" for
grayscale, DICOM and 16-bit files included, "RGB" for colour), which is resized and center-cropped as 8-bit pixels;
only then is it made RGB, rescaled and normalised. The prepared set stores the image at that point, after the crop,
as a PNG of the same 8-bit pixels (one channel for grayscale), so the rest of the processor, run on it, gives
`pixel_values` identical to those of the file: the processor itself (resizing an image that already has its size
returns it unchanged), or `PixelTable` (`ace_lora_hf.data.pixels`) on the device.

The set is a Hugging Face `datasets.DatasetDict` written with `save_to_disk` (Arrow shards, `train` and, with a
validation fraction, `validation`), plus `ace_lora_prepared.json`: the processor settings it was made with, the
split counts and whether they are patient-disjoint. Work is done in chunks written under a hidden folder beside the
output, so a rerun of an interrupted preparation does only the chunks still missing.
"""

import io
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from huggingface_hub import HfApi
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from ..errors import ConfigError, DataFormatError, ImageLoadError
from ..models.ace_lora.image_loading import load_image
from ..outputs.safe_outputs import atomic_folder, write_json_atomic
from .image_tables import ImageTextColumns
from .splits import check_patient_disjoint, patient_disjoint_split


logger = logging.get_logger(__name__)

PREPARED_INFO = "ace_lora_prepared.json"
PROCESSOR_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size")
CHUNK_ROWS = 500
LICENCE_WARNING = ("The MIMIC-CXR and CheXpert licences forbid redistributing their images and reports: push a set "
                   "made from them only to a private repository that only credentialed users of the data can read.")


def cropped_image(image_processor, image: Image.Image) -> Image.Image:
    """The 8-bit image `image_processor` resizes and crops `image` (from `load_image`) to, before it makes it RGB
    and normalises it: mode "L" for a grayscale image, "RGB" for a colour one."""
    pixels = image_processor.process_image(image, do_convert_rgb=True)
    if image_processor.do_resize:
        pixels = image_processor.resize(pixels, image_processor.size, resample=image_processor.resample)
    elif isinstance(pixels, Image.Image):
        pixels = np.asarray(pixels)[None]
    if image_processor.do_center_crop:
        pixels = image_processor.center_crop(pixels, image_processor.crop_size)
    if pixels.dtype != np.uint8:
        raise TypeError(f"the image processor made {pixels.dtype} pixels before normalising; expected uint8")
    return Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))


def processor_settings(image_processor) -> dict:
    """What fixes the prepared images' pixels, as JSON: a set made with other settings would not be exact."""
    settings = image_processor.to_dict()
    return {name: settings.get(name) for name in PROCESSOR_SETTINGS}


def check_processor_settings(info: dict, image_processor, source: str, model: str) -> None:
    """Refuse a prepared set (`info`, its metadata) made with image processor settings other than `image_processor`'s:
    its images are sized for another model, and the pixel values would not be those of the files. `source` and
    `model` name the two in the message (e.g. "--dataset_name DIR", "--model ID")."""
    if info["image_processor"] != processor_settings(image_processor):
        raise ConfigError(f"{source}: prepared with image processor settings {info['image_processor']}, which are not "
                          f"{model}'s; prepare it again with --model (ace-lora-prepare training-set).")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Lossless at any level. Level 0 (stored, about 50 kB a 224 x 224 image, 2.5x level 6) decodes 3-4x faster than
    # the others: a set is written once and read every epoch, by loaders that must keep a GPU fed.
    image.save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _features(label_columns: Sequence[str], with_patient: bool) -> datasets.Features:
    return datasets.Features({
        "image": datasets.Image(), "text": datasets.Value("string"), "line": datasets.Value("int64"),
        **({"patient": datasets.Value("string")} if with_patient else {}),
        **{name: datasets.Value("float32") for name in label_columns},
    })


def _write_chunk(job: tuple) -> str | None:
    """Prepare one chunk of rows into `path` (renamed into place when complete); returns the error of an unreadable
    image instead of raising, so that a worker process hands it back as text."""
    rows, image_processor, label_columns, path = job
    records = {"image": [], "text": rows["text"], "line": rows["line"], **(
        {"patient": rows["patient"]} if "patient" in rows else {})}
    for image_path, line in zip(rows["image"], rows["line"]):
        try:
            image = load_image(image_path, name=f"line {line}: {image_path}")
        except ImageLoadError as error:
            return str(error)
        records["image"].append({"bytes": _png(cropped_image(image_processor, image)), "path": None})
    if label_columns:
        labels = np.asarray(rows["labels"], dtype=np.float32)
        records.update({name: labels[:, index].tolist() for index, name in enumerate(label_columns)})
    features = _features(label_columns, "patient" in rows)
    partial = path.with_suffix(".partial")
    with ArrowWriter(features=features, path=str(partial)) as writer:
        writer.write_batch(features.encode_batch(records))
        writer.finalize()
    os.replace(partial, path)
    return None


def _parts_folder(output: Path, request: dict) -> Path:
    """The hidden folder beside `output` where chunks accumulate; one left by a different request is emptied."""
    parts = output.with_name(f".{output.name}.parts")
    stamp = parts / "request.json"
    if parts.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()) != request):
        logger.info("%s was left by a different preparation; starting again.", parts)
        shutil.rmtree(parts)
    if not parts.is_dir():
        parts.mkdir(parents=True)
        write_json_atomic(stamp, request)
    return parts


def _prepare_chunks(table: datasets.Dataset, image_processor, label_columns: Sequence[str], parts: Path,
                    num_proc: int) -> list[Path]:
    """Every chunk's file, writing those an earlier run has not (`num_proc` processes)."""
    starts = range(0, len(table), CHUNK_ROWS)
    paths = [parts / f"chunk_{index:06d}.arrow" for index in range(len(starts))]
    pending = [(start, path) for start, path in zip(starts, paths) if not path.is_file()]
    if len(pending) < len(paths):
        logger.info("Resuming: %d of %d chunks are already prepared.", len(paths) - len(pending), len(paths))
    # Made as the workers take them: a pool's pipe holds a few, so the rows' texts are never all copied at once.
    jobs = ((table[start:start + CHUNK_ROWS], image_processor, label_columns, path) for start, path in pending)
    with ExitStack() as stack:
        if num_proc > 1 and len(pending) > 1:
            results = stack.enter_context(get_context("spawn").Pool(num_proc)).imap_unordered(_write_chunk, jobs)
        else:
            results = map(_write_chunk, jobs)
        for error in tqdm(results, total=len(pending), desc="preparing", unit="chunk"):
            if error is not None:  # leaving the block stops the other workers; their finished chunks are kept
                raise DataFormatError(f"{error} (fix or remove that row, then run the same command again: the "
                                      "prepared chunks are kept).")
    return paths


def check_column_names(columns: ImageTextColumns) -> None:
    """Refuse a name two columns of the set would share: each column of the table keeps its name, beside `line` and
    `patient` (each row's table line and patient id), and the images and reports are `image` and `text` while the
    set is made."""
    kept = {"line": "each row's table line", "patient": "each row's patient id"}
    named: dict[str, str] = {}
    for kind, name in (("image", columns.image), ("report", columns.text), *(("label", n) for n in columns.labels)):
        if name in kept:
            raise DataFormatError(f"{kind} column {name!r}: a prepared set keeps {kept[name]} under that name; "
                                  "rename the column in the table.")
        if kind == "label" and name in ("image", "text"):
            raise DataFormatError(f"label column {name!r}: a prepared set names its "
                                  f"{'images' if name == 'image' else 'reports'} so while it is made; rename the "
                                  "column in the table.")
        if name in named:
            raise DataFormatError(f"label column {name!r} is given twice; name each column once." if kind == named[name]
                                  else f"{kind} column {name!r} is also the {named[name]} column; give each column "
                                  "its own name.")
        named[name] = kind


def prepare_training_set(table: datasets.Dataset, image_processor, output: Path, columns: ImageTextColumns,
                         source: dict, num_proc: int = 1, validation_fraction: float = 0.0, seed: int = 0) -> dict:
    """Write the prepared set of `table` (from `load_image_text_dataset` with `columns`: `image` paths, `text`,
    `line`, `labels`, optionally `patient`) to `output` and return its metadata (also written as
    `ace_lora_prepared.json`). The set keeps the table's names for the image, report and label columns, so that
    training reads it with the options that read the table.

    With `validation_fraction`, that share of the patients (of the rows, without a patient column) forms a
    `validation` split; every patient's rows stay in one split."""
    check_column_names(columns)
    settings = processor_settings(image_processor)
    label_columns = list(columns.labels)
    request = {"source": source, "label_columns": label_columns, "image_processor": settings}
    parts = _parts_folder(output, request)
    paths = _prepare_chunks(table, image_processor, label_columns, parts, num_proc)
    prepared = datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in paths])
    prepared = prepared.rename_columns({name: wanted for name, wanted in (("image", columns.image),
                                                                          ("text", columns.text)) if name != wanted})
    has_patients = "patient" in table.column_names
    groups = table["patient"] if has_patients else table["line"]
    splits = np.asarray(patient_disjoint_split(groups, validation_fraction, seed), dtype=object)
    patients = check_patient_disjoint(zip(groups, splits, (f"line {line}" for line in table["line"])),
                                      str(source.get("table"))) if has_patients else {}
    info = {**request, "validation_fraction": validation_fraction, "seed": seed,
            "patient_column": source.get("patient_column"), "patient_disjoint": True if has_patients else None,
            "splits": {}}
    subsets = {}
    for name in dict.fromkeys(splits):
        indices = np.flatnonzero(splits == name)
        subsets[name] = prepared.select(indices)
        info["splits"][name] = {"rows": len(indices), **({"patients": patients[name]} if has_patients else {})}
    with atomic_folder(output) as staging:
        datasets.DatasetDict(subsets).save_to_disk(str(staging))
        write_json_atomic(staging / PREPARED_INFO, info)
    shutil.rmtree(parts)
    return info


def read_prepared_info(folder: Path) -> dict | None:
    """The metadata of a prepared set, or None for a folder `prepare_training_set` did not write."""
    path = Path(folder) / PREPARED_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def prepared_image_column(split: datasets.Dataset, source: str) -> str:
    """The name of the image column of a prepared split (its one `datasets.Image` feature: the set keeps the source
    table's name for it)."""
    found = [name for name, feature in split.features.items() if isinstance(feature, datasets.Image)]
    if len(found) != 1:
        raise DataFormatError(f"{source}: {len(found)} image columns ({', '.join(found) or 'none'}); a prepared set "
                              "has one. Prepare it again with ace-lora-prepare training-set.")
    return found[0]


class PreparedImages(Sequence):
    """The stored PNG bytes of chosen rows of a prepared split, each read from the set's Arrow files when it is asked
    for: a set larger than memory is never held, a DataLoader worker receives the dataset by its files rather than
    its bytes, and `select` chooses rows without reading any image. `load_image` reads the items."""

    def __init__(self, split: datasets.Dataset, column: str, rows: Sequence[int] | None = None):
        if split.column_names != [column] or split.features[column].decode:
            # One undecoded column: reading a row reads its PNG bytes and nothing else.
            split = split.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.split, self.column = split, column
        self.rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> bytes:
        return self.split[int(self.rows[index])][self.column]["bytes"]

    def select(self, indices: Sequence[int]) -> "PreparedImages":
        """The images at `indices` (positions in this sequence), still unread."""
        return PreparedImages(self.split, self.column, self.rows[np.asarray(indices, dtype=np.int64)])


def push_prepared_set(folder: Path, repo_id: str, private: bool = True) -> None:
    """Upload a prepared set to the Hub: private unless `private=False`, always with the licence warning, and with
    its metadata (processor settings, split counts, the patient check) beside the data."""
    logger.warning(LICENCE_WARNING)
    datasets.load_from_disk(str(folder)).push_to_hub(repo_id, private=private)
    HfApi().upload_file(path_or_fileobj=str(folder / PREPARED_INFO), path_in_repo=PREPARED_INFO, repo_id=repo_id,
                        repo_type="dataset", commit_message="Add the prepared set's metadata")


__all__ = ["LICENCE_WARNING", "PREPARED_INFO", "PreparedImages", "check_column_names", "check_processor_settings",
           "cropped_image", "prepare_training_set", "prepared_image_column", "processor_settings", "push_prepared_set",
           "read_prepared_info"]
