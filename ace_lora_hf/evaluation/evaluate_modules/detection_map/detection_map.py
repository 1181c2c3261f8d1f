"""The RSNA Pneumonia challenge's mean average precision over IoU thresholds 0.4:0.05:0.75, as an `evaluate` module.

`predictions`: per image `{"boxes": [[x1, y1, x2, y2], ...], "scores": [...]}`; `references`: per image the true
boxes `[[x1, y1, x2, y2], ...]`. See `ace_lora_hf.evaluation.metrics.detection_map`.
"""

import datasets
import evaluate

from ace_lora_hf.evaluation.metrics import detection_map


BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))


class DetectionMap(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features({
            "predictions": {"boxes": BOXES, "scores": datasets.Sequence(datasets.Value("float64"))},
            "references": BOXES,
        })
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="boxes per image",
                                   features=features)

    def _compute(self, predictions, references) -> dict:
        return detection_map(predictions, references)
