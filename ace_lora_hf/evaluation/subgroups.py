"""Every metric per subgroup (each value of a table column such as sex, age_group or view), with its bootstrap
interval computed within the subgroup, and the largest gap between the subgroups of each column."""

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .bootstrap import bootstrap_intervals


def subgroup_metrics(
    metric: Callable[[np.ndarray, np.ndarray], dict],
    predictions: np.ndarray,
    references: np.ndarray,
    columns: Mapping[str, Sequence[str]],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Per column: `groups` (value -> its image count, metrics and intervals; rows with an empty cell belong to no
    group) and `largest_gap` (per scalar metric, the highest and lowest subgroup and their difference)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    report = {}
    for column, values in columns.items():
        values = np.asarray(values, dtype=object)
        groups = {}
        for value in sorted({value for value in values if value != ""}):
            chosen = values == value
            groups[value] = {"num_images": int(chosen.sum()),
                             "metrics": metric(predictions[chosen], references[chosen]),
                             "confidence_intervals_95": bootstrap_intervals(metric, predictions[chosen],
                                                                            references[chosen], resamples, seed)}
        report[column] = {"groups": groups, "largest_gap": largest_gaps(groups)}
    return report


def largest_gaps(groups: Mapping[str, dict]) -> dict[str, dict]:
    """Per scalar metric defined in two or more groups: `{"gap", "highest", "lowest"}`."""
    gaps = {}
    names = {name for group in groups.values() for name, value in group["metrics"].items() if np.isscalar(value)}
    for name in sorted(names):
        defined = {value: group["metrics"][name] for value, group in groups.items()
                   if np.isscalar(group["metrics"].get(name)) and not np.isnan(group["metrics"][name])}
        if len(defined) >= 2:
            ordered = sorted(defined, key=defined.get)
            lowest, highest = ordered[0], ordered[-1]
            gaps[name] = {"gap": defined[highest] - defined[lowest], "highest": highest, "lowest": lowest}
    return gaps


__all__ = ["largest_gaps", "subgroup_metrics"]
