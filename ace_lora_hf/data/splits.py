"""Splits that keep each patient's images together: a patient seen in training and again in validation or test
makes every score on that split optimistic, since the model has seen that patient's anatomy."""

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from ..errors import DataFormatError


def patient_disjoint_split(patients: Sequence[Hashable], validation_fraction: float, seed: int,
                           names: tuple[str, str] = ("train", "validation")) -> list[str]:
    """The split name of each row, with every patient's rows in the same split: about `validation_fraction` of the
    patients (sklearn's `GroupShuffleSplit` with `random_state=seed`) go to the second split."""
    if not 0 < validation_fraction < 1:
        return [names[0]] * len(patients)
    if len(set(patients)) < 2:
        raise DataFormatError(f"only one patient ({patients[0]!r}): a patient-disjoint validation split needs two or "
                              "more; leave out --validation_fraction.")
    splitter = GroupShuffleSplit(n_splits=1, test_size=validation_fraction, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(patients)), groups=list(patients)))
    assigned = np.full(len(patients), names[0], dtype=object)
    assigned[held_out] = names[1]
    return assigned.tolist()


def check_patient_disjoint(rows: Iterable[tuple[Hashable, str, str]], source: str) -> dict[str, int]:
    """Refuse a split table that puts one patient in two splits, naming the patient, the two splits and where each
    is seen. `rows` are `(patient, split, where)`, `where` a row of `source` ("line 7"); returns the number of
    patients in each split."""
    first_seen: dict[Hashable, tuple[str, str]] = {}
    patients: dict[str, int] = {}
    for patient, split, where in rows:
        earlier = first_seen.setdefault(patient, (split, where))
        if earlier[0] != split:
            raise DataFormatError(f"{source}, {where}: patient {patient} is in split {split!r}, but {earlier[1]} puts "
                                  f"them in split {earlier[0]!r}; a patient's images must all be in one split: fix the "
                                  "split table.")
        if earlier[1] == where:
            patients[split] = patients.get(split, 0) + 1
    return patients


__all__ = ["check_patient_disjoint", "patient_disjoint_split"]
