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
    """`[low, high]` of every scalar that `metric(predictions, references)` returns, over `resamples` resamplings of
    the images with replacement. A resample where a metric is undefined (an AUC over one class) is left out of that
    metric's interval; an interval with no defined resample is `[nan, nan]`."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    generator = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        chosen = generator.integers(0, len(references), len(references))
        for name, value in metric(predictions[chosen], references[chosen]).items():
            if np.isscalar(value):
                samples.setdefault(name, []).append(float(value))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values)
        defined = values[~np.isnan(values)]
        intervals[name] = ([float(np.percentile(defined, tail)), float(np.percentile(defined, 100 - tail))]
                           if defined.size else [float("nan"), float("nan")])
    return intervals


__all__ = ["bootstrap_intervals"]
