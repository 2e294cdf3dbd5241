"""Calibrated confidence and conformal label sets, fitted on reference cells a method never saw.

Each method's held-out cells are reference cells labelled without themselves: for the two kNN
methods, by the reference cells of the other folds (folds grouped by donor, else by batch, else
stratified); for the classifier, the classify stage's out-of-fold predictions (its folds).
Every held-out cell has its true label, the method's raw confidence (the winning label's vote
share, or the top class probability) and a score per label (vote shares, or probabilities).

* Calibration: Platt scaling, a logistic regression (scikit-learn) of "the best label is right"
  on the logit of the raw confidence. A calibrated confidence of 0.8 means about 80 % of such
  reference cells were labelled right. Not isotonic regression: its steps put blocks of cells on
  one value, and where a step sits just under ``min_confidence`` a block is unassigned at once
  (on PBMC 3k -> pbmc68k_reduced, 16 classifier calls with raw probabilities 0.50-0.53 went to
  0.492, 11 of them right); the ECE on held-out PBMC 3k cells is 0.007-0.010 either way.
* Prediction sets: split-conformal with the score 1 - p(label): a label is in a cell's set when
  its conformal p-value is at least alpha, so the set holds the true label of a new cell like the
  held-out ones with probability at least 1 - alpha. The p-values are smoothed (ties broken at
  random, seeded): vote shares take few values, and without smoothing coverage would sit far
  above 1 - alpha. So where a method is right on more than 1 - alpha of held-out cells, some sure
  calls get an empty set at random: that is what exact coverage costs.
* Support: the best label's unsmoothed p-value among the held-out cells of that label,
  (#{those whose true label scored at most as well} + 1) / (n + 1). Below ``novelty_alpha`` (0.01),
  the cell's neighbours (or its classifier) back its best label less than the true label of all but
  1 % of the held-out cells of that type: the cell is unassigned. A unanimous vote has support 1.
  Not at ``alpha``: where a method is near-perfect on held-out cells, alpha's tenth of them is
  exactly the cells that were not unanimous, and most of those were right.
* Typicality: the conformal p-value of a cell's mean distance to its nearest reference cells
  among the held-out cells' own distances (an out-of-reference score that does not look at labels).
* Measured honestly: both are fitted on the other folds' held-out cells and applied to each
  fold in turn (cross-fitting); the reliability table, the expected calibration error and the
  coverage come from those out-of-fold values.

The p-values are crepes' smoothed p-values (``crepes.base.p_values_batch``), computed by sorting
instead of by a loop over cells and labels: crepes takes 1.6 s for 10,000 cells x 10 labels
against 5,000 calibration cells, which would be minutes per method at a million query cells.
The tests check this code against crepes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellatlas.errors import AtlasError
from cellatlas.metrics import expected_calibration_error, reliability

#: fewest held-out cells a method is calibrated on (and at least 1 / alpha)
MIN_HELDOUT = 100
#: held-out cells at most (a seeded sample, stratified by label): the kNN search costs this times the reference
MAX_HELDOUT = 20_000
N_FOLDS = 5


def heldout_folds(labels: pd.Series, groups: pd.Series | None = None, *, n_splits: int = N_FOLDS, seed: int = 0,
                  max_cells: int = MAX_HELDOUT) -> tuple[np.ndarray, np.ndarray]:
    """The fold of each reference cell (-1: unlabelled), and which cells are held out.

    Grouped (no group in two folds) when ``groups`` has at least two values; stratified by label
    otherwise. Returns ``(fold, heldout)``; ``heldout`` marks a stratified seeded sample of at
    most ``max_cells`` labelled cells. Not the classify stage's ``make_folds``: it leaves out a
    class with fewer cells than folds, and rare types are the ones calibration must keep.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = labels.astype("string").to_numpy(dtype=object, na_value=None)
    labelled = np.flatnonzero(pd.notna(y))
    fold = np.full(len(y), -1)
    g = None if groups is None else groups.astype("string").to_numpy(dtype=object, na_value="")[labelled]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a label with fewer cells than folds
        if g is not None and len(set(g)) >= 2:
            splitter = StratifiedGroupKFold(min(n_splits, len(set(g))), shuffle=True, random_state=seed)
            parts = splitter.split(labelled, y[labelled].astype(str), g)
        else:
            splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
            parts = splitter.split(labelled, y[labelled].astype(str))
        for k, (_, test) in enumerate(parts):
            fold[labelled[test]] = k
    heldout = np.zeros(len(y), bool)
    heldout[labelled[sample(y[labelled].astype(str), max_cells, seed=seed)]] = True
    return fold, heldout


def sample(y: np.ndarray, max_cells: int = MAX_HELDOUT, *, seed: int = 0) -> np.ndarray:
    """Positions of a seeded sample of at most ``max_cells`` of ``y``, stratified by label where
    scikit-learn can (every label twice, and as many cells left over as labels)."""
    if len(y) <= max_cells:
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    labels, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and len(y) - max_cells >= len(labels) and max_cells >= len(labels) else None
    keep, _ = train_test_split(np.arange(len(y)), train_size=max_cells, random_state=seed, stratify=stratify)
    return np.sort(keep)


def p_values(calibration: np.ndarray, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smoothed conformal p-values of nonconformity ``scores`` (any shape) against ``calibration``:
    (#{cal > s} + u * (#{cal == s} + 1)) / (n + 1), u uniform on [0, 1)."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    above = len(cal) - np.searchsorted(cal, s, side="right")
    ties = np.searchsorted(cal, s, side="right") - np.searchsorted(cal, s, side="left")
    return (above + rng.random(s.shape) * (ties + 1)) / (len(cal) + 1)


def typicality(distance: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Conformal p-value of each cell's distance to its nearest reference cells among the held-out
    cells' own: (#{reference >= distance} + 1) / (n + 1). Small for a cell farther from the
    reference than almost every held-out cell; at most tau for a share tau of cells like the held-out ones."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    d = np.asarray(distance, dtype=np.float64)
    return (len(ref) - np.searchsorted(ref, d, side="left") + 1) / (len(ref) + 1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)  # a unanimous vote is 1
    return np.log(p / (1 - p))


@dataclass
class Platt:
    """P(right) = sigmoid(slope * logit(confidence) + intercept); a constant where every held-out
    cell was right (or every one wrong)."""

    slope: float
    intercept: float
    constant: float | None = None

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray) -> Platt:
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(correct, dtype=np.float64)
        if y.min() == y.max():
            return cls(0.0, 0.0, float(y[0]))
        model = LogisticRegression(C=1e6).fit(_logit(confidence)[:, None], y.astype(int))  # unpenalized
        return cls(float(model.coef_[0, 0]), float(model.intercept_[0]))

    def predict(self, confidence: np.ndarray) -> np.ndarray:
        if self.constant is not None:
            return np.full(len(np.asarray(confidence)), self.constant)
        return 1.0 / (1.0 + np.exp(-(self.slope * _logit(confidence) + self.intercept)))


@dataclass
class Calibration:
    """A method's calibration, fitted on held-out cells: :meth:`apply` it to new cells.

    The sets and the support are class-conditional (Mondrian) conformal: a label's p-values are
    taken among the held-out cells of that label, so each label's cells are covered at 1 - alpha,
    rare types included (with one pool for all, PBMC 3k's 13 platelets were never covered by the
    projection's sets, and a near-perfect classifier's few uncertain types lost their calls). A
    label with fewer than 1 / alpha held-out cells is judged against all held-out cells.
    """

    classes: list[str]
    alpha: float
    seed: int
    platt: Platt
    distances: np.ndarray
    #: per class: the nonconformity (1 - score of the true label) of its held-out cells
    nonconformity: list[np.ndarray]

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray, true_scores: np.ndarray, distance: np.ndarray,
            true_class: np.ndarray, *, classes: list[str], alpha: float, seed: int = 0) -> Calibration:
        """``true_scores``: each held-out cell's score for its true label (0 when the method cannot
        give that label), ``true_class`` that label's index in ``classes`` (-1: none);
        ``distance``: its mean distance to its nearest reference cells."""
        pooled = 1.0 - np.asarray(true_scores, dtype=np.float64)
        true_class = np.asarray(true_class)
        enough = math.ceil(1.0 / alpha)
        per_class = [pooled[true_class == j] if (true_class == j).sum() >= enough else pooled for j in range(len(classes))]
        return cls(list(classes), float(alpha), int(seed), Platt.fit(confidence, correct),
                   np.sort(np.asarray(distance, dtype=np.float64)), per_class)

    def apply(self, confidence: np.ndarray, scores: np.ndarray, distance: np.ndarray) -> Applied:
        """The calibration on new cells (``scores``: cells x :attr:`classes`)."""
        scores = np.asarray(scores, dtype=np.float64)
        rng = np.random.default_rng(self.seed)
        p = np.column_stack([p_values(cal, 1.0 - scores[:, j], rng) for j, cal in enumerate(self.nonconformity)]) \
            if len(self.classes) else np.zeros((len(scores), 0))
        best = scores.argmax(axis=1) if scores.shape[1] else np.zeros(len(scores), int)
        support = np.ones(len(scores))
        for j, cal in enumerate(self.nonconformity):
            rows = best == j
            support[rows] = p_values(cal, 1.0 - scores[rows, j], _Upper())
        return Applied(calibrated=self.platt.predict(confidence), sets=p >= self.alpha, support=support,
                       typicality=typicality(distance, self.distances))


class _Upper:
    """The unsmoothed p-value: u = 1 in :func:`p_values` (#{cal >= s} + 1) / (n + 1)."""

    @staticmethod
    def random(shape):
        return np.ones(shape)


@dataclass
class Applied:
    """A calibration applied to cells."""

    #: the chance that the best label is right, as on held-out cells with this raw confidence
    calibrated: np.ndarray
    #: cells x classes: the label is in the cell's prediction set (smoothed p-value >= alpha)
    sets: np.ndarray
    #: the best label's unsmoothed conformal p-value among the held-out cells of that label
    support: np.ndarray
    #: out-of-reference score: conformal p-value of the cell's distance to its nearest reference cells
    typicality: np.ndarray


@dataclass
class HeldOut:
    """A method's held-out reference cells: ``table`` has ``label``, ``fold``, ``best_label``,
    ``confidence`` (raw), ``distance`` (mean distance to the nearest reference cells of the other
    folds) and one ``score_<class>`` column per class the method can give. ``left_out``: the same
    cells labelled as if their type were new (the kNN methods; None for the classifier)."""

    table: pd.DataFrame
    left_out: pd.DataFrame | None = None

    @property
    def classes(self) -> list[str]:
        return [c[len("score_"):] for c in self.table.columns if c.startswith("score_")]

    def scores(self, table: pd.DataFrame | None = None) -> np.ndarray:
        table = self.table if table is None else table
        return table[[f"score_{c}" for c in self.classes]].to_numpy(dtype=np.float64)

    def true_class(self, table: pd.DataFrame | None = None) -> np.ndarray:
        """Each cell's label as an index into :attr:`classes` (-1: a label the method cannot give)."""
        table = self.table if table is None else table
        index = {c: i for i, c in enumerate(self.classes)}
        return table["label"].astype(str).map(index).fillna(-1).to_numpy(dtype=int)

    def true_scores(self) -> np.ndarray:
        """Each cell's score for its true label (0 where the method cannot give it)."""
        true = self.true_class()
        return np.where(true >= 0, self.scores()[np.arange(len(true)), np.maximum(true, 0)], 0.0)

    def correct(self) -> np.ndarray:
        return (self.table["best_label"].astype(str) == self.table["label"].astype(str)).to_numpy()

    def fit(self, *, alpha: float, seed: int = 0, rows: np.ndarray | None = None) -> Calibration:
        rows = np.arange(len(self.table)) if rows is None else rows
        return Calibration.fit(self.table["confidence"].to_numpy()[rows], self.correct()[rows],
                               self.true_scores()[rows], self.table["distance"].to_numpy()[rows],
                               self.true_class()[rows], classes=self.classes, alpha=alpha, seed=seed)


def check_heldout(held: HeldOut, *, atlas: str, method: str, alpha: float) -> None:
    """Enough held-out cells, in at least two folds, to calibrate and to measure the calibration."""
    need = max(MIN_HELDOUT, math.ceil(1.0 / alpha))
    n, folds = len(held.table), held.table["fold"].nunique()
    if n < need or folds < 2:
        raise AtlasError(atlas, f"method '{method}': {n} held-out reference cells in {folds} fold(s) to calibrate on; "
                                f"at least {need} in 2 folds are needed (atlas.alpha {alpha:g} needs {math.ceil(1 / alpha)})")


def cross_fit(held: HeldOut, *, alpha: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Each held-out cell's calibrated confidence and set from a calibration fitted on the other folds.

    Returns the held-out table with ``calibrated``, ``support``, ``typicality``, ``set_size``,
    ``covered`` (its true label is in its set) and ``label_set``; and the same for the
    ``left_out`` cells (None without).
    """
    calibrations = {f: held.fit(alpha=alpha, seed=seed + k, rows=np.flatnonzero(held.table["fold"].to_numpy() != f))
                    for k, f in enumerate(np.unique(held.table["fold"]))}
    out = _applied(held.table, held, calibrations)
    lo = held.left_out
    return out, (None if lo is None else _applied(lo, held, calibrations))


def _applied(table: pd.DataFrame, held: HeldOut, calibrations: dict) -> pd.DataFrame:
    """``table``'s cells under the calibration of their fold."""
    folds = table["fold"].to_numpy()
    calibrated, typical, support = np.zeros(len(table)), np.zeros(len(table)), np.zeros(len(table))
    sets = np.zeros((len(table), len(held.classes)), bool)
    scores, distance = held.scores(table), table["distance"].to_numpy()
    for f, cal in calibrations.items():
        test = folds == f
        applied = cal.apply(table["confidence"].to_numpy()[test], scores[test], distance[test])
        calibrated[test], sets[test] = applied.calibrated, applied.sets
        typical[test], support[test] = applied.typicality, applied.support
    true = held.true_class(table)
    covered = (true >= 0) & sets[np.arange(len(table)), np.maximum(true, 0)]
    out = table[["label", "fold", "best_label", "confidence", "distance"]].copy()
    out["calibrated"] = calibrated
    out["support"] = support
    out["typicality"] = typical
    out["set_size"] = sets.sum(axis=1)
    out["covered"] = covered
    out["label_set"] = label_sets(sets, np.asarray(held.classes))
    return out


def novelty(crossed: pd.DataFrame, left_out: pd.DataFrame | None, *, min_confidence: float,
            novelty_alpha: float = 0.01) -> tuple[dict[str, float], pd.DataFrame]:
    """Leave one type out: per reference type, its held-out cells labelled without it against the
    other types' held-out cells. AUROC of the unassigned rule's two scores (1 - support, 1 -
    calibrated confidence) and of 1 - typicality; the share of the type left unassigned, and of
    the other types' cells unassigned (calibrated confidence below ``min_confidence``, support or
    typicality below ``novelty_alpha``; proximity, which only the query's cells have, is left out)."""
    from sklearn.metrics import roc_auc_score

    def unassigned(t: pd.DataFrame) -> np.ndarray:
        return ((t["calibrated"] < min_confidence) | (t["support"] < novelty_alpha)
                | (t["typicality"] < novelty_alpha)).to_numpy()

    rows = []
    if left_out is None:  # the classifier: no left-out cells
        left_out = crossed.iloc[:0]
    for label, new in left_out.groupby("label", observed=True, sort=True):
        known = crossed[crossed["label"].astype(str) != str(label)]
        if len(new) < 2 or not len(known):
            continue
        y = np.r_[np.ones(len(new)), np.zeros(len(known))]
        row = {"left_out": str(label), "n_cells": len(new), "n_known": len(known)}
        for name, col in (("support", "support"), ("confidence", "calibrated"), ("typicality", "typicality")):
            row[f"auroc_{name}"] = float(roc_auc_score(y, -np.r_[new[col].to_numpy(), known[col].to_numpy()]))
        row["unassigned_novel"] = float(unassigned(new).mean())
        row["unassigned_known"] = float(unassigned(known).mean())
        rows.append(row)
    table = pd.DataFrame(rows, columns=["left_out", "n_cells", "n_known", "auroc_support", "auroc_confidence",
                                        "auroc_typicality", "unassigned_novel", "unassigned_known"])
    if table.empty:
        return {}, table
    metrics = {f"novel/{k}": float(table[k].mean()) for k in ("auroc_support", "auroc_confidence", "auroc_typicality",
                                                                 "unassigned_novel", "unassigned_known")}
    metrics["novel/auroc_support_min"] = float(table["auroc_support"].min())
    return metrics, table


def label_sets(sets: np.ndarray, classes: np.ndarray) -> list[str]:
    """Each cell's set as its labels joined by '|' (empty text for an empty set)."""
    return ["|".join(classes[row]) for row in sets]


def coverage_table(crossfitted: pd.DataFrame) -> pd.DataFrame:
    """Per label and overall (label ``all``): cells, coverage, mean set size, share of empty and
    of single-label sets."""
    def row(label, part):
        return {"label": label, "n_cells": len(part), "coverage": float(part["covered"].mean()),
                "mean_set_size": float(part["set_size"].mean()), "empty": float((part["set_size"] == 0).mean()),
                "single": float((part["set_size"] == 1).mean())}

    rows = [row("all", crossfitted)]
    rows += [row(str(label), part) for label, part in crossfitted.groupby("label", observed=True, sort=True)]
    return pd.DataFrame(rows)


def summarize(crossfitted: pd.DataFrame, *,
              novelty_alpha: float = 0.01) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame]:
    """Metrics, the reliability table (raw and calibrated) and the coverage table of a cross-fit."""
    correct = (crossfitted["best_label"].astype(str) == crossfitted["label"].astype(str)).to_numpy()
    before = reliability(crossfitted["confidence"].to_numpy(), correct)
    after = reliability(crossfitted["calibrated"].to_numpy(), correct)
    table = pd.concat([before.assign(confidence="raw"), after.assign(confidence="calibrated")], ignore_index=True)
    coverage = coverage_table(crossfitted)
    per_label = coverage[coverage["label"] != "all"]
    metrics = {"n_heldout": float(len(crossfitted)), "heldout_accuracy": float(correct.mean()),
               "ece_raw": expected_calibration_error(before), "ece": expected_calibration_error(after),
               "coverage": float(crossfitted["covered"].mean()),
               "coverage_min_label": float(per_label["coverage"].min()) if len(per_label) else np.nan,
               "mean_set_size": float(crossfitted["set_size"].mean()),
               "single_label_sets": float((crossfitted["set_size"] == 1).mean()),
               # held-out cells the support rule alone would leave unassigned (all are of known types)
               "low_support": float((crossfitted["support"] < novelty_alpha).mean()),
               "low_typicality": float((crossfitted["typicality"] < novelty_alpha).mean())}
    return metrics, table[["confidence", *before.columns]], coverage
