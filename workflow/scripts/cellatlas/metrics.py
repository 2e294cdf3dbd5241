"""The scores of a prediction, one definition for every model kind (scikit-learn or Lightning)."""

from __future__ import annotations

import warnings

import numpy as np

from cellatlas import keys


def scores(kind: str, y_true, y_pred) -> dict[str, float]:
    """The task's metrics (``keys.CLASSIFICATION_METRICS`` or ``keys.REGRESSION_METRICS``)."""
    from sklearn import metrics as skm

    if kind == keys.CLASSIFICATION:
        with warnings.catch_warnings():
            # a fold may predict a class absent from its test cells; that is scored, not an error
            warnings.simplefilter("ignore", UserWarning)
            return {
                "accuracy": float(skm.accuracy_score(y_true, y_pred)),
                "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
                # over the classes among the test cells: a grouped fold may lack a class, which
                # would otherwise enter the mean as F1 = 0 (its false positives still cost recall)
                "macro_f1": float(skm.f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
            }
    return {
        "r2": float(skm.r2_score(y_true, y_pred)),
        "mse": float(skm.mean_squared_error(y_true, y_pred)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
    }
