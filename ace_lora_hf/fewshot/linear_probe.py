"""The linear probe: logistic regression on frozen, L2-normalised image embeddings (as in CLIP's evaluation).

Its inverse regularisation strength C is chosen by 4-fold stratified cross-validation on the shots where every class
has at least 4 of them (from `C_GRID`, by accuracy); with fewer there is nothing to validate on, and C is
`DEFAULT_C`. The C used is returned, for the results table.
"""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold


MIN_SHOTS_FOR_CV = 4
DEFAULT_C = 1.0  # scikit-learn's default
C_GRID = np.logspace(-2, 3, 11)  # 0.01 to 1000, half a decade apart
MAX_ITERATIONS = 1000


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, seed: int) -> tuple[LogisticRegression, float]:
    """A logistic regression of `targets` on `features` and its C (see the module's docstring)."""
    smallest_class = np.bincount(targets).min()
    if smallest_class >= MIN_SHOTS_FOR_CV:
        folds = StratifiedKFold(n_splits=MIN_SHOTS_FOR_CV, shuffle=True, random_state=seed)
        search = GridSearchCV(LogisticRegression(max_iter=MAX_ITERATIONS, random_state=seed), {"C": C_GRID},
                              scoring="accuracy", cv=folds)
        C = float(search.fit(features, targets).best_params_["C"])
    else:
        C = DEFAULT_C
    probe = LogisticRegression(C=C, max_iter=MAX_ITERATIONS, random_state=seed)
    return probe.fit(features, targets), C


__all__ = ["C_GRID", "DEFAULT_C", "MIN_SHOTS_FOR_CV", "fit_linear_probe"]
