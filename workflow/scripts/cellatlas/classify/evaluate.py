"""Cross-validation of one model on a task's folds, the final model and its informative genes.

Every fold clones the same unfitted pipeline (gene selection, scaling, PCA, estimator) and fits
it on that fold's training rows only; test rows are seen only by ``predict``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.pipeline import Pipeline

from cellatlas import keys
from cellatlas.classify.features import gene_weights
from cellatlas.classify.splits import Folds
from cellatlas.metrics import expected_calibration_error, reliability, scores

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    #: one row per fold: fold, n_train, n_test, the task's metrics, fit_seconds, predict_seconds
    folds: pd.DataFrame
    #: per cell, out-of-fold: prediction and (classification) class probabilities; NaN/None elsewhere
    predictions: pd.DataFrame
    #: fitted pipeline of each fold (kept for permutation importance)
    fitted: list[Pipeline]

    def aggregate(self) -> dict[str, float]:
        """``<metric>_mean`` and ``<metric>_sd`` (sample sd over folds; 0 with one fold)."""
        out = {}
        for m in self.folds.columns:
            if m in ("fold", "n_train", "n_test"):
                continue
            v = self.folds[m].to_numpy(dtype=float)
            out[f"{m}_mean"] = float(np.mean(v))
            out[f"{m}_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        return out


def _targets(folds: Folds) -> np.ndarray:
    y = folds.table["target"].to_numpy()
    return y.astype(float) if folds.kind == keys.REGRESSION else y


def _proba(pipe: Pipeline, X, classes: list[str]) -> np.ndarray | None:
    """Class probabilities in the task's class order (0 for a class the fold never saw)."""
    if not hasattr(pipe, "predict_proba"):
        return None
    p = pipe.predict_proba(X)
    out = np.zeros((X.shape[0], len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, c in enumerate(pipe.classes_):
        out[:, index[str(c)]] = p[:, j]
    return out


#: ``fit_params(label, rows)`` -> keyword arguments of one fit (``label``: "fold_<k>" or "final")
FitParams = Callable[[str, np.ndarray], dict]


def cross_validate(X, folds: Folds, pipeline: Pipeline, fit_params: FitParams | None = None) -> CVResult:
    """Fit a clone of ``pipeline`` per fold on its training rows; score it on its test rows."""
    y = _targets(folds)
    classes = folds.classes
    n = X.shape[0]
    pred = np.full(n, None, dtype=object) if folds.kind == keys.CLASSIFICATION else np.full(n, np.nan)
    proba = np.full((n, len(classes)), np.nan)
    rows, fitted = [], []
    for k, (train, test) in enumerate(folds.splits()):
        pipe = clone(pipeline)
        t0 = time.perf_counter()
        pipe.fit(X[train], y[train], **(fit_params(f"fold_{k}", train) if fit_params else {}))
        t1 = time.perf_counter()
        p = pipe.predict(X[test])
        if folds.kind == keys.CLASSIFICATION:
            pr = _proba(pipe, X[test], classes)
            if pr is not None:
                proba[test] = pr
        t2 = time.perf_counter()
        pred[test] = p
        row = {"fold": k, "n_train": len(train), "n_test": len(test), **scores(folds.kind, y[test], p)}
        row.update(fit_seconds=t1 - t0, predict_seconds=t2 - t1)
        log.info("fold %d: %s", k, {m: round(v, 4) for m, v in row.items() if isinstance(v, float)})
        rows.append(row)
        fitted.append(pipe)
    predictions = pd.DataFrame({"prediction": pred}, index=folds.table.index)
    for j, c in enumerate(classes):
        predictions[f"prob_{c}"] = proba[:, j]
    return CVResult(pd.DataFrame(rows), predictions, fitted)


def per_class(folds: Folds, cv: CVResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class precision, recall, F1 and support, pooled over the out-of-fold predictions,
    with the F1 and recall of each class as mean and sd over folds; and the pooled confusion
    matrix (rows: true class, columns: predicted class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = folds.classes
    tested = folds.table["test_fold"].to_numpy() >= 0
    y_true = folds.table["target"].to_numpy()[tested].astype(str)
    y_pred = cv.predictions["prediction"].to_numpy()[tested].astype(str)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    table = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    fold_f1, fold_recall = [], []
    for _, test in folds.splits():
        yt = folds.table["target"].to_numpy()[test].astype(str)
        yp = cv.predictions["prediction"].to_numpy()[test].astype(str)
        _, rk, fk, sk = precision_recall_fscore_support(yt, yp, labels=classes, zero_division=0)
        # a class absent from a fold's test cells has no recall or F1 in that fold
        fold_f1.append(np.where(sk > 0, fk, np.nan))
        fold_recall.append(np.where(sk > 0, rk, np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class in no test fold: NaN, not a warning
        table["f1_fold_mean"] = np.nanmean(fold_f1, axis=0)
        table["f1_fold_sd"] = np.nanstd(fold_f1, axis=0, ddof=1) if len(fold_f1) > 1 else 0.0
        table["recall_fold_mean"] = np.nanmean(fold_recall, axis=0)
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    confusion = pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=classes)
    return table, confusion


def calibration_error(folds: Folds, cv: CVResult) -> float | None:
    """Expected calibration error of the out-of-fold top-class probabilities (None without
    probabilities); ties between models go to the lower (:func:`cellatlas.classify.compare.compare`)."""
    if folds.kind != keys.CLASSIFICATION:
        return None
    tested = folds.table["test_fold"].to_numpy() >= 0
    probs = cv.predictions[[f"prob_{c}" for c in folds.classes]].to_numpy(dtype=float)[tested]
    if not np.isfinite(probs).all():
        return None
    top = probs.argmax(axis=1)
    correct = np.asarray(folds.classes, dtype=object)[top] == folds.table["target"].to_numpy()[tested].astype(str)
    return expected_calibration_error(reliability(probs.max(axis=1), correct))


def fit_final(X, folds: Folds, pipeline: Pipeline, fit_params: FitParams | None = None) -> Pipeline:
    """The model refitted on all training rows (every used cell; the train batches for ``batches``)."""
    rows = folds.training_rows()
    pipe = clone(pipeline)
    pipe.fit(X[rows], _targets(folds)[rows], **(fit_params("final", rows) if fit_params else {}))
    return pipe


def final_predictions(X, folds: Folds, final: Pipeline, cv: CVResult) -> pd.DataFrame:
    """Per cell: the measured target, the test fold, and the prediction with its source.

    Cells in a test fold keep their out-of-fold prediction (the honest one); every other cell
    (no target, left out, training-only) gets the final model's prediction.
    """
    out = pd.DataFrame({"target": folds.table["target"], "test_fold": folds.table["test_fold"]})
    out = out.join(cv.predictions)
    oof = folds.table["test_fold"].to_numpy() >= 0
    rest = np.flatnonzero(~oof)
    out["source"] = np.where(oof, "out_of_fold", "final_model")
    if len(rest):
        out.iloc[rest, out.columns.get_loc("prediction")] = final.predict(X[rest])
        if folds.kind == keys.CLASSIFICATION:
            pr = _proba(final, X[rest], folds.classes)
            if pr is not None:
                for j, c in enumerate(folds.classes):
                    out.iloc[rest, out.columns.get_loc(f"prob_{c}")] = pr[:, j]
    if folds.kind == keys.CLASSIFICATION:
        probs = [c for c in out.columns if c.startswith("prob_")]
        if probs:
            out["confidence"] = out[probs].max(axis=1)
    return out


def _linear_coef(model) -> np.ndarray:
    if hasattr(model, "calibrated_classifiers_"):
        return np.mean([np.atleast_2d(c.estimator.coef_) for c in model.calibrated_classifiers_], axis=0)
    return np.atleast_2d(model.coef_)


def importance(
    X,
    folds: Folds,
    final: Pipeline,
    cv: CVResult,
    *,
    method: str,
    gene_names,
    n_top: int = 25,
    max_cells: int = 1000,
    n_repeats: int = 3,
    candidates: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """The model's most informative genes.

    ``coef``: the final model's coefficients on standardized genes (per class for
    classification, through the PCA loadings when the input is PCA). ``impurity``: the final
    forest's mean impurity decrease per gene (genes input only). ``permutation``: the drop of the
    task's primary metric when one gene is shuffled among held-out cells (fold 0's model on up
    to ``max_cells`` of its test cells, ``n_repeats`` shuffles), for ``candidates`` genes
    pre-ranked by their F statistic on fold 0's training rows.

    Returns
    -------
    Table ``gene``, ``class`` (empty when not per class), ``importance``, ``sd``, ``method``, ``rank``.
    """
    genes = np.asarray(gene_names).astype(str)
    model = final.named_steps["model"]
    rows = []
    if method == "coef":
        w = gene_weights(final, _linear_coef(model), len(genes))
        if folds.kind == keys.CLASSIFICATION:
            names = [str(c) for c in model.classes_]
            if w.shape[0] != len(names):  # binary: one row, positive for classes_[1]
                w = np.vstack([-w[0], w[0]])
            for c, wc in zip(names, w):
                for g in np.argsort(-wc, kind="stable")[:n_top]:
                    rows.append({"gene": genes[g], "class": c, "importance": wc[g], "sd": np.nan})
        else:
            for g in np.argsort(-np.abs(w[0]), kind="stable")[:n_top]:
                rows.append({"gene": genes[g], "class": "", "importance": w[0, g], "sd": np.nan})
    elif method == "none":  # pixels are no genes: an image model lists none
        pass
    elif method == "impurity" and "pca" not in final.named_steps:
        w = gene_weights(final, model.feature_importances_, len(genes))[0]
        for g in np.argsort(-w, kind="stable")[:n_top]:
            rows.append({"gene": genes[g], "class": "", "importance": w[g], "sd": np.nan})
    else:
        method = "permutation"
        rows = _permutation(X, folds, cv, genes, n_top, max_cells, n_repeats, candidates, seed)
    table = pd.DataFrame(rows, columns=["gene", "class", "importance", "sd"])
    table["method"] = method
    table["rank"] = table.groupby("class").cumcount() + 1
    return table


def _permutation(X, folds, cv, genes, n_top, max_cells, n_repeats, candidates, seed) -> list[dict]:
    import scipy.sparse as sp
    from sklearn.feature_selection import f_classif, f_regression

    rng = np.random.default_rng(seed)
    y = _targets(folds)
    train, test = folds.splits()[0]
    pipe = cv.fitted[0]
    support = pipe.named_steps["select"].support_
    f = f_classif if folds.kind == keys.CLASSIFICATION else f_regression
    with np.errstate(divide="ignore", invalid="ignore"):
        F = np.nan_to_num(f(X[train][:, support], y[train])[0], nan=-np.inf)
    cand = support[np.argsort(-F, kind="stable")[:candidates]]
    cells = np.sort(rng.choice(test, min(max_cells, len(test)), replace=False))
    Xt = X[cells]
    Xt = Xt.toarray() if sp.issparse(Xt) else np.array(Xt)  # a small slice: held-out cells only
    yt = y[cells]
    primary = keys.PRIMARY_METRIC[folds.kind]
    base = scores(folds.kind, yt, pipe.predict(Xt))[primary]
    rows = []
    for g in cand:
        original = Xt[:, g].copy()
        drops = []
        for _ in range(n_repeats):
            Xt[:, g] = rng.permutation(original)
            drops.append(base - scores(folds.kind, yt, pipe.predict(Xt))[primary])
        Xt[:, g] = original
        rows.append({"gene": genes[g], "class": "", "importance": float(np.mean(drops)), "sd": float(np.std(drops))})
    rows.sort(key=lambda r: -r["importance"])
    return rows[:n_top]
