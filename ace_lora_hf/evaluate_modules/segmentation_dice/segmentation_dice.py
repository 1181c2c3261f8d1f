"""Dice of binary segmentation masks, per image (mean) and pooled over all pixels, as an `evaluate` module.

`predictions` and `references` are 2-D masks (lists of rows; anything > 0 is foreground). An image with neither a
true nor a predicted foreground counts as Dice 1 in the per-image mean.
"""

import datasets
import evaluate

from ace_lora_hf.metrics import dice_metrics


MASK = datasets.Sequence(datasets.Sequence(datasets.Value("int8")))


class SegmentationDice(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="2-D 0/1 masks",
                                   features=datasets.Features({"predictions": MASK, "references": MASK}))

    def _compute(self, predictions, references) -> dict:
        return dice_metrics(predictions, references)
