"""Confidence intervals of evaluation metrics by the percentile bootstrap over images (seeded, reproducible)."""

from collections.abc import Callable

import numpy as np


def bootstrap_intervals(
    metric: Callable[[np.ndarray, np.ndarray], dict],
    predictions: np.ndarray,
    references: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """`[low, high]` of every scalar that `metric(predictions, references)` returns (and one per element of a list,
    such as the AUC of each finding), over `resamples` resamplings of the images with replacement. A resample where a
    metric is undefined (an AUC over one class) is left out of that metric's interval; an interval with no defined
    resample is `[nan, nan]`."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    generator = np.random.default_rng(seed)
    samples: dict[str, list] = {}
    for _ in range(resamples):
        chosen = generator.integers(0, len(references), len(references))
        for name, value in metric(predictions[chosen], references[chosen]).items():
            if np.isscalar(value) or isinstance(value, list):
                samples.setdefault(name, []).append(np.asarray(value, dtype=float))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        values = np.stack(values)  # [resamples] or [resamples, elements]
        intervals[name] = (_interval(values, tail) if values.ndim == 1
                           else [_interval(column, tail) for column in values.T])
    return intervals


def _interval(values: np.ndarray, tail: float) -> list[float]:
    defined = values[~np.isnan(values)]
    if not defined.size:
        return [float("nan"), float("nan")]
    return [float(np.percentile(defined, tail)), float(np.percentile(defined, 100 - tail))]


__all__ = ["bootstrap_intervals"]
