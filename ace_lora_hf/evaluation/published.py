"""The results the ACE-LoRA paper publishes, which evaluations are compared against and model cards show."""

from typing import NamedTuple


class PublishedResult(NamedTuple):
    task: str
    dataset: str
    metric: str
    value: float  # in percent


# The paper's published results (ACE-LoRA, arXiv 2603.17079): zero-shot, segmentation and detection.
PUBLISHED_RESULTS = (
    PublishedResult("zero-shot-image-classification", "RSNA Pneumonia", "AUC", 87.19),
    PublishedResult("zero-shot-image-classification", "CheXpert 5x200", "accuracy", 49.8),
    PublishedResult("image-segmentation", "SIIM-ACR Pneumothorax", "Dice", 46.34),
    PublishedResult("object-detection", "RSNA Pneumonia", "mAP", 21.29),
    PublishedResult("zero-shot-image-classification", "MHIST", "accuracy", 57.27),
    PublishedResult("zero-shot-image-classification", "LC25000 (lung)", "accuracy", 84.03),
    PublishedResult("zero-shot-image-classification", "LC25000 (colon)", "accuracy", 90.39),
)


__all__ = ["PUBLISHED_RESULTS", "PublishedResult"]
