"""How far scores are from being probabilities, and the temperature that brings zero-shot logits closer.

Expected calibration error (ECE) uses 15 equal-width confidence bins on [0, 1] (the first bin closed on both sides):
the mean over images of |accuracy - confidence| within each bin, weighted by the bin's share of images. For
single-label sets the confidence is the top class's probability and accuracy whether that class is the true one; for
multi-label sets (one 0/1 column per finding) each finding's probability is binned against its outcome, and the ECE
and Brier score are the mean over findings. The Brier score of a single-label set is the mean over images of the
squared distance between the probability vector and the one-hot truth (0 is perfect, 2 the worst); NLL is the mean
negative log-probability of the true class.
"""

import numpy as np
import torch


ECE_BINS = 15


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin: its range, the number of images, their mean confidence and their accuracy."""
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, bins - 1)
    return [{"low": float(edges[i]), "high": float(edges[i + 1]), "count": int((index == i).sum()),
             "confidence": float(confidences[index == i].mean()), "accuracy": float(correct[index == i].mean())}
            for i in range(bins) if (index == i).any()]


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    total = len(np.asarray(confidences))
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidences, correct, bins)))


def top_class(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-class confidence and whether the top class is the true one, per image of a single-label set."""
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == targets


def calibration_metrics(probabilities, targets) -> dict[str, float]:
    """ECE and Brier score (and NLL for single-label sets) of `[N, C]` probabilities; `targets` are `[N]` class
    indices or `[N, C]` 0/1 outcomes."""
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets).astype(int)
    if targets.ndim == 2:
        return {"ece": float(np.mean([expected_calibration_error(probabilities[:, c], targets[:, c])
                                      for c in range(targets.shape[1])])),
                "brier": float(((probabilities - targets) ** 2).mean())}
    one_hot = np.eye(probabilities.shape[1])[targets]
    true_class = np.clip(probabilities[np.arange(len(targets)), targets], 1e-12, 1.0)
    return {"ece": expected_calibration_error(*top_class(probabilities, targets)),
            "brier": float(((probabilities - one_hot) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(true_class).mean())}


def fit_temperature(logits, targets, max_iterations: int = 200) -> float:
    """The temperature that minimises the NLL of `softmax(logits / T)` on a labelled validation set (`[N, C]` logits,
    `[N]` class indices): one scalar, fitted by L-BFGS on log T so that it stays positive."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_temperature.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())


__all__ = ["ECE_BINS", "calibration_metrics", "expected_calibration_error", "fit_temperature",
           "reliability_bins", "top_class"]
