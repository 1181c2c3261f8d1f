"""The images of a few-shot run: labelled tables read and checked, and the shots drawn from them with a seed.

The shots of a seed are nested: each class's images are shuffled once by the seed and the first K taken, so the
2-shot set of a seed holds its 1-shot set, as K grows only images are added (and a share of the table likewise).
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.image_tables import missing_file, numbered_rows, read_table
from ..data.prepared import PreparedImages
from ..errors import DataFormatError
from ..models.ace_lora.batch_inference import ImageInput


@dataclass(frozen=True)
class LabelledImages:
    """Labelled images of a table or of a prepared set's split: the images as the model's loader reads them (resolved
    paths, or a prepared set's lazily read PNG bytes), a name for each (its path, or e.g. `train[17]`: messages, the
    embedding cache and shots.csv use it), their class indices into `classes`, and each row's line in its table."""

    table: Path
    images: Sequence[ImageInput]
    names: list[str]
    targets: np.ndarray
    classes: tuple[str, ...]
    lines: list[int]
    split: str | None = None

    @property
    def source(self) -> str:
        """The table, or the prepared set and its split, as messages name it."""
        return str(self.table) if self.split is None else f"{self.table} (split {self.split})"

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        images = (self.images.select(indices) if isinstance(self.images, PreparedImages)
                  else [self.images[i] for i in indices])  # a prepared set's rows stay unread
        return replace(self, images=images, names=[self.names[i] for i in indices],
                       targets=self.targets[list(indices)], lines=[self.lines[i] for i in indices])

    def count(self, class_index: int) -> int:
        return int((self.targets == class_index).sum())


def read_labelled_table(table: Path, image_column: str, label_column: str, image_root: Path | None,
                        classes: Sequence[str] | None, option: str) -> LabelledImages:
    """The rows of `table` (CSV or JSON Lines): an image path (relative to `image_root`, default the table's folder)
    and a class name. With `classes`, every label must be one of them; otherwise the classes are the table's labels,
    sorted. Every image file is checked to exist."""
    advice = "Name yours with --image-column / --label-column."
    frame = read_table(table, [image_column, label_column], option, column_advice=advice, unique=image_column)
    root = image_root if image_root is not None else table.parent
    found = sorted({label.strip() for label in frame[label_column]} - {""})
    classes = tuple(classes) if classes else tuple(found)
    images, targets, lines = [], [], []
    for line, record in numbered_rows(frame):
        problem = missing_file(root, record[image_column], image_column)
        label = record[label_column].strip()
        if problem is None and label not in classes:
            problem = f"column {label_column!r} is {label!r}, not one of the classes {list(classes)} (--labels)"
        if problem:
            raise DataFormatError(f"{table}, line {line}: {problem}.")
        images.append(str(root / record[image_column]))
        targets.append(classes.index(label))
        lines.append(line)
    return LabelledImages(table, images, list(images), np.asarray(targets, dtype=np.int64), classes, lines)


def check_classes(pool: LabelledImages, shots: Sequence[int]) -> None:
    """Refuse, before any work, a class with fewer images than the largest K, or with none (a class of --labels)."""
    needed = max(shots, default=1)
    for index, name in enumerate(pool.classes):
        count = pool.count(index)
        if count == 0:
            raise DataFormatError(f"{pool.source}: class {name!r} has no image; add images of that class or leave it "
                                  "out of --labels.")
        if count < needed:
            raise DataFormatError(f"{pool.source}: class {name!r} has {count} image(s), fewer than --shots {needed}; "
                                  "add images of that class or ask for fewer shots.")


def draw_shots(pool: LabelledImages, seed: int, shots: int | None = None, fraction: float | None = None) -> list[int]:
    """Indices into `pool` of `shots` images per class, or of `fraction` of each class's images (at least one), drawn
    by `seed`; in class order, then in the seed's order."""
    if (shots is None) == (fraction is None):
        raise ValueError("Give shots or fraction.")
    order = np.random.default_rng(seed)
    chosen = []
    for index in range(len(pool.classes)):
        members = np.flatnonzero(pool.targets == index)
        shuffled = members[order.permutation(len(members))]
        wanted = shots if shots is not None else max(1, round(fraction * len(members)))
        chosen.extend(shuffled[:wanted].tolist())
    return chosen


__all__ = ["LabelledImages", "check_classes", "draw_shots", "read_labelled_table"]
