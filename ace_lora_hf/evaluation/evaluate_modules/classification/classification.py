"""Zero-shot classification metrics of ACE-LoRA's evaluations, as an `evaluate` module.

Configurations:
- `multiclass` (default): `predictions` are per-class probabilities, `references` class indices; returns top-1
  accuracy and ROC AUC (positive class with two classes, macro one-vs-rest with more).
- `multilabel`: `predictions` are per-class scores, `references` multi-hot vectors; returns the macro ROC AUC and
  the AUC of each class.
"""

import datasets
import evaluate

from ace_lora_hf.evaluation.metrics import classification_metrics, multilabel_metrics


FEATURES = {
    "multiclass": datasets.Features(
        {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
    ),
    "multilabel": datasets.Features(
        {"predictions": datasets.Sequence(datasets.Value("float64")),
         "references": datasets.Sequence(datasets.Value("int64"))}
    ),
}


class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        config = self.config_name if self.config_name in FEATURES else "multiclass"
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: [N, C] scores; references: [N] class indices or [N, C] multi-hot.",
            features=FEATURES[config],
        )

    def _compute(self, predictions, references) -> dict:
        if self.config_name == "multilabel":
            return multilabel_metrics(predictions, references)
        return classification_metrics(predictions, references)
