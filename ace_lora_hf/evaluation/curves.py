"""The pictures of an evaluation report (PNG, needs matplotlib: the [plot] extra): the reliability diagram, and the
ROC and precision-recall curves of each thresholded label."""

import importlib.util
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from ..errors import MissingDependencyError
from ..outputs.safe_outputs import atomic_file
from .calibration import reliability_bins


PLOT_EXTRA_HINT = "pip install 'ace-lora-hf[plot]'"


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure():
    if not plotting_available():
        raise MissingDependencyError(f"Drawing the report's curves needs matplotlib: {PLOT_EXTRA_HINT}")
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot's) holds no global state.
    figure = Figure(figsize=(5, 5), dpi=100)
    return figure, figure.add_subplot()


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png")
    return path


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Accuracy against mean confidence per bin, one line per curve (e.g. before and after temperature scaling)."""
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, (confidences, correct) in curves.items():
        bins = reliability_bins(confidences, correct)
        axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=name)
    axes.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    axes.legend(loc="upper left")
    return _save(figure, path)


def roc_and_pr_curves(probabilities: np.ndarray, outcomes: dict[str, np.ndarray], stem: Path) -> list[Path]:
    """`<stem>_roc.png` and `<stem>_pr.png`, one curve per label (`outcomes`: label -> (column, 0/1 per image)) with
    both outcomes among the images (a curve is undefined without)."""
    outcomes = {label: (column, positives) for label, (column, positives) in outcomes.items()
                if 0 < np.sum(positives) < len(positives)}
    roc_figure, roc_axes = _figure()
    pr_figure, pr_axes = _figure()
    roc_axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    for label, (column, positives) in outcomes.items():
        false_positive_rate, true_positive_rate, _ = roc_curve(positives, probabilities[:, column])
        roc_axes.plot(false_positive_rate, true_positive_rate,
                      label=f"{label} (AUC {auc(false_positive_rate, true_positive_rate):.3f})")
        precision, recall, _ = precision_recall_curve(positives, probabilities[:, column])
        pr_axes.plot(recall, precision, label=label)
    roc_axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    pr_axes.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    for axes in (roc_axes, pr_axes):
        axes.legend(loc="lower right", fontsize="small")
    return [_save(roc_figure, stem.with_name(stem.name + "_roc.png")),
            _save(pr_figure, stem.with_name(stem.name + "_pr.png"))]


__all__ = ["PLOT_EXTRA_HINT", "plotting_available", "reliability_diagram", "roc_and_pr_curves"]
