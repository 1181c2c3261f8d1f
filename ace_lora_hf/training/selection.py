"""The choice of `best/`: which entry of a record (an epoch's end, or the step where `--max_train_steps` stopped the
run) picks the best point, in which direction, and how the choice is said."""

import math
from dataclasses import dataclass

from .state import TrainingProgress


@dataclass(frozen=True)
class Selection:
    """Which entry of a record picks the best point of a run, and in which direction."""

    metric: str
    higher_is_better: bool

    def score(self, record: dict) -> float | None:
        """The record's score, lower is better; None when the metric is missing or not finite."""
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            return None
        return -value if self.higher_is_better else value

    def keep_if_best(self, record: dict, progress: TrainingProgress) -> bool:
        """Whether `record`'s point becomes `best/` (the first point, or one with a better score); if so, `progress`
        notes it. The record then says where `best/` stands (`record["best"]`)."""
        score = self.score(record)
        is_best = progress.best_epoch is None or (score is not None and (progress.best_score is None
                                                                         or score < progress.best_score))
        if is_best:
            progress.best_score, progress.best_epoch, progress.best_step = score, record["epoch"], record["step"]
        record["best"] = {"epoch": progress.best_epoch, "step": progress.best_step}
        return is_best

    def describe(self, details: dict) -> str:
        """One line saying which point `best/` holds, from the details saved with it."""
        where = f"epoch {details.get('epoch')} (step {details.get('step')})"
        if details.get("stopped_by"):
            where = (f"epoch {details.get('epoch')} up to step {details.get('step')}, where --{details['stopped_by']} "
                     "stopped the run")
        return f"best/ holds {where}: {self.metric} {details.get(self.metric)}"


__all__ = ["Selection"]
