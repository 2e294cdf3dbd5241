"""Scores of a mapping against the query's own labels, and agreement between methods."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cellatlas.errors import AtlasError

from cellatlas.atlas import UNASSIGNED

log = logging.getLogger(__name__)


def accepted_labels(query_labels, reference_labels: Sequence[str],
                    correspondence: Mapping[str, Sequence[str]] | None = None) -> dict[str, set[str]]:
    """Each query label's accepted reference labels: those the correspondence table lists for it,
    else the reference label of the same name; an empty set marks a type the reference lacks."""
    ref = set(map(str, reference_labels))
    table = {str(k): set(map(str, v)) for k, v in (correspondence or {}).items()}
    return {str(q): table.get(str(q), {str(q)} & ref) for q in query_labels}


def check_correspondence(correspondence: Mapping[str, Sequence[str]] | None, reference_labels: Sequence[str], *,
                         atlas: str, reference: str, query: str) -> None:
    """A correspondence table names only labels the reference has (else a one-line error)."""
    ref = set(map(str, reference_labels))
    if unknown := sorted({str(r) for accepted in (correspondence or {}).values() for r in accepted} - ref):
        raise AtlasError(atlas, f"query '{query}': atlas.atlases.{atlas}.correspondence names labels reference "
                                f"'{reference}' lacks: {', '.join(unknown[:5])} (its labels: "
                                f"{', '.join(sorted(ref)[:15])})")


def evaluate(predicted: pd.Series, truth: pd.Series | None, reference_labels: Sequence[str],
             label_set: pd.Series | None = None, correspondence: Mapping[str, Sequence[str]] | None = None,
             best_label: pd.Series | None = None):
    """Scores of transferred labels against the query's own labels.

    A query cell's transferred label is right when it is one of the reference labels its own label
    accepts (:func:`accepted_labels`: by name, or by a ``correspondence`` table where the query's
    annotation names types differently). Accuracy, balanced accuracy and macro-F1 are over the
    query cells whose label accepts some reference label (an unassigned cell counts as wrong
    there); cells of other labels ("novel") should come out unassigned. With prediction sets
    (``label_set``: labels joined by '|'), the share of shared-type cells whose set holds an
    accepted label (``set_coverage``) and of novel-type cells whose set is empty
    (``empty_set_novel``). With each cell's ``best_label`` (the label before the unassigned call),
    the accuracy had every cell been given it (``forced_accuracy``, as a method that never abstains
    is scored) and the accuracy of the calls made (``assigned_accuracy``). Returns (metrics, per-label table, crosstab of predicted by query
    label); without query labels, only the assignment rates and an empty crosstab.
    """
    import sklearn.metrics as skm

    pred = predicted.astype(str).to_numpy()
    metrics: dict[str, float] = {"n_cells": float(len(pred)), "unassigned_fraction": float(np.mean(pred == UNASSIGNED))}
    if truth is None or truth.notna().sum() == 0:
        counts = pd.Series(pred).value_counts()
        return metrics, pd.DataFrame({"predicted": counts.index, "n_cells": counts.to_numpy()}), pd.DataFrame()
    labelled = truth.notna().to_numpy()
    true = truth.astype(str).to_numpy()
    accepted = accepted_labels(np.unique(true[labelled]), reference_labels, correspondence)
    right = np.array([ok and p in accepted[t] for ok, t, p in zip(labelled, true, pred)], dtype=bool)
    shared = labelled & np.array([ok and bool(accepted[t]) for ok, t in zip(labelled, true)], dtype=bool)
    novel = labelled & ~shared
    metrics.update({"n_shared_type_cells": float(shared.sum()), "n_novel_type_cells": float(novel.sum())})
    if shared.any():
        # a right call counts as the query's own label, so the scores are over the query's types
        y, p = true[shared], np.where(right, true, pred)[shared]
        present = np.unique(y)
        metrics.update({
            "accuracy": float(skm.accuracy_score(y, p)),
            "balanced_accuracy": float(skm.recall_score(y, p, labels=present, average="macro", zero_division=0)),
            "macro_f1": float(skm.f1_score(y, p, labels=present, average="macro", zero_division=0)),
            "unassigned_shared": float(np.mean(p == UNASSIGNED)),
        })
        if (assigned := shared & (pred != UNASSIGNED)).any():
            metrics["assigned_accuracy"] = float(right[assigned].mean())
        if best_label is not None:
            best = best_label.astype(str).to_numpy()
            metrics["forced_accuracy"] = float(np.mean([b in accepted[t] for t, b in zip(true[shared], best[shared])]))
    if novel.any():
        metrics["unassigned_novel"] = float(np.mean(pred[novel] == UNASSIGNED))
    covered = None
    if label_set is not None:
        sets = label_set.fillna("").astype(str).to_numpy()
        covered = np.array([ok and bool(accepted[t] & set(s.split("|"))) for ok, t, s in zip(labelled, true, sets)])
        if shared.any():
            metrics["set_coverage"] = float(covered[shared].mean())
        if novel.any():
            metrics["empty_set_novel"] = float(np.mean(sets[novel] == ""))
    rows = []
    for label in sorted(np.unique(true[labelled])):
        sel = labelled & (true == label)
        p = pred[sel]
        top = pd.Series(p).value_counts()
        known = bool(accepted[label])
        rows.append({"query_label": label, "in_reference": known, "accepted": "|".join(sorted(accepted[label])),
                     "n_cells": int(sel.sum()), "recall": float(np.mean(right[sel])) if known else np.nan,
                     "unassigned": float(np.mean(p == UNASSIGNED)),
                     "most_common": str(top.index[0]), "most_common_fraction": float(top.iloc[0] / sel.sum()),
                     **({"set_coverage": float(covered[sel].mean()) if known else np.nan}
                        if covered is not None else {})})
    crosstab = pd.crosstab(pd.Series(true[labelled], name="query_label"), pd.Series(pred[labelled], name="predicted"))
    ref = set(map(str, reference_labels))
    order = [c for c in sorted(reference_labels) if c in crosstab.columns] + \
            [c for c in crosstab.columns if c not in ref and c != UNASSIGNED] + \
            ([UNASSIGNED] if UNASSIGNED in crosstab.columns else [])
    return metrics, pd.DataFrame(rows), crosstab[order]


def agreement_between(labels: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Pairwise agreement of methods: share of cells with the same label, and Cohen's kappa."""
    from sklearn.metrics import cohen_kappa_score

    names = sorted(labels)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = labels[a].astype(str).to_numpy(), labels[b].astype(str).to_numpy()
            both = (x != UNASSIGNED) & (y != UNASSIGNED)
            rows.append({"method_a": a, "method_b": b, "same_label": float(np.mean(x == y)),
                         "kappa": float(cohen_kappa_score(x, y)) if len(set(x) | set(y)) > 1 else 1.0,
                         "both_assigned": float(np.mean(both)),
                         "same_label_when_both_assigned": float(np.mean(x[both] == y[both])) if both.any() else np.nan})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "same_label", "kappa", "both_assigned",
                                       "same_label_when_both_assigned"])
