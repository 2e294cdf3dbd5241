"""The scores of a prediction, one definition for every model kind (scikit-learn or Lightning),
and how well its confidence is calibrated."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

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


#: bins of a reliability table (equal width on [0, 1])
N_BINS = 10


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Confidence bins against observed accuracy: ``bin``, ``lower``, ``upper``, ``n_cells``,
    ``mean_confidence``, ``accuracy`` (NaN for an empty bin). A bin holds [lower, upper); 1 is in
    the last (torchmetrics' binning)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(confidence, edges, right=False) - 1, 0, n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=confidence, minlength=n_bins) / n
        acc = np.bincount(b, weights=correct, minlength=n_bins) / n
    return pd.DataFrame({"bin": np.arange(n_bins), "lower": edges[:-1], "upper": edges[1:], "n_cells": n,
                         "mean_confidence": conf, "accuracy": acc})


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Sum over bins of the share of cells times |accuracy - mean confidence| (a :func:`reliability` table)."""
    full = table[table["n_cells"] > 0]
    w = full["n_cells"] / full["n_cells"].sum()
    return float((w * (full["accuracy"] - full["mean_confidence"]).abs()).sum())
