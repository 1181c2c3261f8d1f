"""Training data from Hugging Face `datasets` (`--dataset_name`, as transformers' CLIP example takes it): a folder
written by `save_to_disk` (a prepared set among them), Parquet or Arrow files, or a dataset on the Hub (read from
the local cache when offline). Every problem (nothing there, a missing split or column) is a `DataFormatError`
naming the source, found before any model is loaded."""

import glob
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.exceptions import DatasetNotFoundError
from transformers.utils import logging

from ..errors import DataFormatError
from .image_tables import ImageTextColumns
from .prepared import read_prepared_info


logger = logging.get_logger(__name__)

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
STREAM_SHARDS = 64  # a saved dataset streamed: enough shards for processes x workers to share evenly


@dataclass
class TrainingSource:
    """Where a `--dataset_name` run reads from: the dataset (map-style, or a stream), its prepared-set metadata (None
    for other datasets) and what identifies it in a checkpoint's signature."""

    dataset: datasets.Dataset | datasets.IterableDataset
    prepared_info: dict | None
    signature: dict


def _files(name: str) -> list[str] | None:
    """The Parquet or Arrow files `name` gives (a file, or a glob pattern), or None for anything else."""
    if Path(name).suffix.lower() not in FILE_BUILDERS:
        return None
    files = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
    if not files or not all(Path(file).is_file() for file in files):
        raise DataFormatError(f"--dataset_name {name}: no such file; give a save_to_disk folder, Parquet or Arrow "
                              "files, or a Hub dataset id.")
    return files


def _load(name: str, config: str | None, split: str, streaming: bool):
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        saved = datasets.load_from_disk(name)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataFormatError(f"--dataset_name {name}: no split {split!r} (it has {', '.join(saved)}); "
                                      "choose one with --dataset_split.")
            saved = saved[split]
        return saved.to_iterable_dataset(num_shards=min(STREAM_SHARDS, len(saved))) if streaming else saved
    files = _files(name)
    try:
        if files is not None:
            return datasets.load_dataset(FILE_BUILDERS[Path(files[0]).suffix.lower()], data_files=files,
                                         split="train", streaming=streaming)
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise DataFormatError(f"--dataset_name {name}: cannot load it ({' '.join(str(error).split())}); give a "
                              "save_to_disk folder, Parquet or Arrow files, or a Hub dataset id (downloaded once "
                              "online: offline runs read the cache).") from None
    except ValueError as error:  # e.g. an unknown split or config name
        raise DataFormatError(f"--dataset_name {name}: {' '.join(str(error).split())} (see --dataset_config_name "
                              "and --dataset_split).") from None


def _check_columns(dataset, name: str, columns: ImageTextColumns, split_value: str | None) -> None:
    found = dataset.column_names
    if found is None:  # a stream whose features are unknown until it is read: the collator names a missing column
        return
    wanted = [columns.image, columns.text, *columns.labels, *([columns.split] if split_value else [])]
    missing = [column for column in wanted if column not in found]
    if missing:
        raise DataFormatError(f"--dataset_name {name}: no column {missing[0]!r} (it has {', '.join(found)}); name "
                              "yours with --image_column / --text_column / --label_columns (or --no_labels).")


def load_training_source(name: str, columns: ImageTextColumns, config: str | None = None, split: str = "train",
                         split_value: str | None = None, streaming: bool = False) -> TrainingSource:
    """The dataset `name` names, checked to have `columns`, its images left undecoded (the collator decodes them
    in the loader's workers) and, with `split_value`, only the rows whose split column holds it."""
    dataset = _load(name, config, split, streaming)
    _check_columns(dataset, name, columns, split_value)
    if isinstance((dataset.features or {}).get(columns.image), datasets.Image):
        dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
    if split_value:  # a map-style filter keeps its row indices in memory, writing nothing into the dataset's folder
        dataset = dataset.filter(lambda value: value == split_value, input_columns=columns.split,
                                 **({} if streaming else {"keep_in_memory": True}))
    if not streaming and len(dataset) == 0:
        raise DataFormatError(f"--dataset_name {name}: no rows" + (f" in split {split_value!r}." if split_value
                                                                      else "."))
    prepared = read_prepared_info(Path(name)) if Path(name).is_dir() else None
    signature = {"dataset_name": name, "dataset_config_name": config, "dataset_split": split,
                 "train_split": split_value, "streaming": streaming}
    if isinstance(dataset, datasets.Dataset):
        signature.update(dataset_fingerprint=dataset._fingerprint, train_rows=len(dataset))
    return TrainingSource(dataset, prepared, signature)


__all__ = ["TrainingSource", "load_training_source"]
