"""The few-shot protocol: for each K (or share of the training table) and seed, draw the shots, adapt by each method
and score the test table; the zero-shot baseline once (K = 0: no shots, no seed).

Frozen image embeddings are computed once per image (`EmbeddingCache`) and shared by the zero-shot baseline and the
linear probe of every K and seed; only the prompt-initialised head, whose adapters change, encodes images again.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..evaluation.metrics import classification_metrics
from ..models.ace_lora.zero_shot import (CHEST_XRAY_TEMPLATES, ZeroShotClassifier, zero_shot_logits,
                                         zero_shot_probabilities)
from .embeddings import EmbeddingCache
from .linear_probe import fit_linear_probe
from .prompt_classifier import HeadTraining, train_and_score
from .sampling import LabelledImages, draw_shots


ZERO_SHOT, LINEAR_PROBE, PROMPT_HEAD = "zero-shot", "linear-probe", "prompt-head"
METHODS = (ZERO_SHOT, LINEAR_PROBE, PROMPT_HEAD)


@dataclass(frozen=True)
class FewShotPlan:
    """What to run: K per class (`shots`) or shares of the training table (`fractions`), each for every seed."""

    shots: tuple[int, ...] = ()
    fractions: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (1, 2, 3)
    methods: tuple[str, ...] = METHODS
    templates: tuple[str, ...] = CHEST_XRAY_TEMPLATES
    training: HeadTraining = HeadTraining()

    def settings(self) -> list[dict]:
        """Each setting as the records name it: `{"shots": K, "fraction": None}` or the other way round."""
        return ([{"shots": k, "fraction": None} for k in self.shots]
                + [{"shots": None, "fraction": f} for f in self.fractions])


@dataclass
class FewShotResults:
    """One record per method, setting and seed (metrics, and the probe's C), and one row per shot drawn."""

    records: list[dict] = field(default_factory=list)
    shots: list[dict] = field(default_factory=list)


class FewShotRunner:
    """Runs a `FewShotPlan` for a model (unmerged LoRA, float32) and its processor; `on_record` hears of each result
    as it comes (the command line prints it)."""

    def __init__(self, model, processor, plan: FewShotPlan, batch_size: int = 16, num_workers: int | None = None,
                 on_record: Callable[[dict], None] | None = None):
        self.model, self.processor, self.plan = model.eval(), processor, plan
        self.batch_size, self.num_workers = batch_size, num_workers
        self.on_record = on_record or (lambda record: None)
        self.embeddings = EmbeddingCache(model, processor.image_processor, batch_size, num_workers)
        self.classifier = ZeroShotClassifier(model, processor, plan.templates, batch_size, num_workers)

    def run(self, pool: LabelledImages, test: LabelledImages) -> FewShotResults:
        results = FewShotResults()
        classes = self.classifier.class_embeddings(pool.classes).float().cpu()
        test_features = self.embeddings(test)
        if ZERO_SHOT in self.plan.methods:
            zero_shot = zero_shot_probabilities(zero_shot_logits(self.model.logit_scale.detach().float().cpu(),
                                                                 test_features, classes))
            self._record(results, ZERO_SHOT, {"shots": 0, "fraction": None}, None, zero_shot.numpy(), test)
        for setting in self.plan.settings():
            for seed in self.plan.seeds:
                chosen = pool.subset(draw_shots(pool, seed, setting["shots"], setting["fraction"]))
                results.shots.extend({**setting, "seed": seed, "image": name, "label": chosen.classes[target],
                                      "line": line} for name, target, line in
                                     zip(chosen.names, chosen.targets, chosen.lines))
                self._adapt(results, setting, seed, chosen, test, test_features, classes)
        return results

    def _adapt(self, results: FewShotResults, setting: dict, seed: int, chosen: LabelledImages,
               test: LabelledImages, test_features: torch.Tensor, classes: torch.Tensor) -> None:
        if LINEAR_PROBE in self.plan.methods:
            probe, C = fit_linear_probe(self.embeddings(chosen).numpy(), chosen.targets, seed)
            self._record(results, LINEAR_PROBE, setting, seed, probe.predict_proba(test_features.numpy()), test, C=C)
        if PROMPT_HEAD in self.plan.methods:
            probabilities = train_and_score(self.model, self.processor.image_processor, classes, chosen, test, seed,
                                            self.plan.training, self.batch_size, self.num_workers)
            self._record(results, PROMPT_HEAD, setting, seed, probabilities, test)

    def _record(self, results: FewShotResults, method: str, setting: dict, seed: int | None,
                probabilities: np.ndarray, test: LabelledImages, **extra) -> None:
        metrics = classification_metrics(probabilities, test.targets)
        record = {"method": method, **setting, "seed": seed, **metrics, **extra}
        results.records.append(record)
        self.on_record(record)


__all__ = ["LINEAR_PROBE", "METHODS", "PROMPT_HEAD", "ZERO_SHOT", "FewShotPlan", "FewShotResults", "FewShotRunner"]
