"""Dice of binary segmentation masks, as an `evaluate` module: the mean over the images with a true foreground
(`dice_positive`) and one Dice pooled over all pixels (`dice_pooled`), with the image counts they rest on.

`predictions` and `references` are 2-D masks (lists of rows; anything > 0 is foreground). See
`ace_lora_hf.evaluation.metrics.dice_metrics`.
"""

import datasets
import evaluate

from ace_lora_hf.evaluation.metrics import dice_metrics


MASK = datasets.Sequence(datasets.Sequence(datasets.Value("int8")))


class SegmentationDice(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="2-D 0/1 masks",
                                   features=datasets.Features({"predictions": MASK, "references": MASK}))

    def _compute(self, predictions, references) -> dict:
        return dice_metrics(predictions, references)
