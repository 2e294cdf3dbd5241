"""A task's target and its cross-validation folds, fixed once and shared by every model.

The folds are a table with one row per cell: the target, the group (donor or batch) and
``test_fold``, the fold whose test set holds the cell (``keys.TRAIN_ONLY`` for cells used only
for training, ``keys.EXCLUDED`` for cells left out, with the reason in ``excluded``). Bad
targets are one-line :class:`~cellatlas.errors.TaskError`\\ s; recoverable problems (a rare class,
fewer donors than folds, cells without a target) are documented fallbacks, listed in ``notes``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellatlas import keys
from cellatlas.errors import TaskError

log = logging.getLogger(__name__)

#: a classification target with more distinct numeric values than this is a measured quantity
MAX_NUMERIC_CLASSES = 50


@dataclass
class Folds:
    """The folds of one task; ``table`` is indexed by cell name."""

    table: pd.DataFrame
    kind: str
    scheme: str
    n_splits: int
    group_key: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def used(self) -> np.ndarray:
        return (self.table["test_fold"] != keys.EXCLUDED).to_numpy()

    @property
    def classes(self) -> list[str]:
        if self.kind != keys.CLASSIFICATION:
            return []
        return sorted(self.table.loc[self.used, "target"].astype(str).unique())

    def splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(train, test)`` row positions into ``table`` for each fold."""
        fold = self.table["test_fold"].to_numpy()
        used = fold != keys.EXCLUDED
        return [(np.flatnonzero(used & (fold != k)), np.flatnonzero(fold == k)) for k in range(self.n_splits)]

    def training_rows(self) -> np.ndarray:
        """Rows the final model is fitted on: every cell the task uses (train batches only for ``batches``)."""
        fold = self.table["test_fold"].to_numpy()
        if self.scheme == "batches":
            return np.flatnonzero(fold == keys.TRAIN_ONLY)
        return np.flatnonzero(fold != keys.EXCLUDED)

    def summary(self) -> dict:
        fold = self.table["test_fold"]
        out = {
            "kind": self.kind,
            "split": self.scheme,
            "n_splits": self.n_splits,
            "group_key": self.group_key or "",
            "cells_used": int(self.used.sum()),
            "cells_excluded": int((fold == keys.EXCLUDED).sum()),
            "notes": self.notes,
        }
        if self.kind == keys.CLASSIFICATION:
            out["classes"] = self.classes
            out["n_classes"] = len(self.classes)
        return out

    def write(self, table_path: str | Path, meta_path: str | Path) -> None:
        self.table.to_csv(table_path, sep="\t", index_label="cell")
        Path(meta_path).write_text(json.dumps(self.summary(), indent=2) + "\n")

    @classmethod
    def read(cls, table_path: str | Path, meta_path: str | Path) -> Folds:
        meta = json.loads(Path(meta_path).read_text())
        # names and labels as written: "01" must not come back as 1
        dtype = {"cell": str, "group": str, "excluded": str}
        if meta["kind"] == keys.CLASSIFICATION:
            dtype["target"] = str
        table = pd.read_csv(table_path, sep="\t", index_col="cell", keep_default_na=False, na_values=[""], dtype=dtype)
        table.index = table.index.astype(str)
        if meta["kind"] == keys.CLASSIFICATION:
            table["target"] = table["target"].astype("string").astype(object).where(table["target"].notna(), None)
        table["excluded"] = table["excluded"].fillna("")
        return cls(table, meta["kind"], meta["split"], meta["n_splits"], meta["group_key"] or None, meta["notes"])


def _target(obs: pd.DataFrame, dataset: str, task: str, target: str, kind: str) -> pd.Series:
    """The target column, checked for its kind; missing values stay missing (NaN/None)."""
    if target not in obs.columns:
        avail = ", ".join(map(str, list(obs.columns)[:15]))
        raise TaskError(dataset, task, f"target '{target}' is not an obs column (columns: {avail})")
    col = obs[target]
    if kind == keys.REGRESSION:
        if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            example = col.dropna().astype(str).iloc[0] if col.notna().any() else "nothing"
            raise TaskError(dataset, task, f"regression target '{target}' is not numeric (dtype {col.dtype}, e.g. '{example}')")
        values = col.astype(float)
        if np.isinf(values).any():
            raise TaskError(dataset, task, f"regression target '{target}' has {int(np.isinf(values).sum())} infinite values")
        return values
    if pd.api.types.is_float_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype):
        present = col.dropna()
        if not np.all(np.mod(present, 1) == 0) or present.nunique() > MAX_NUMERIC_CLASSES:
            raise TaskError(
                dataset, task,
                f"classification target '{target}' is numeric with {present.nunique()} distinct values; "
                "for a measured quantity set kind: regression",
            )
        # "1", not "1.0": integer codes keep their spelling whether or not some are missing
        return present.astype(int).astype(str).astype(object).reindex(col.index).where(col.notna(), None)
    text = col.astype("string").astype(object)
    return text.where(col.notna(), None)


#: fewest cells of a class a training fold may hold (0 is fine: the class just cannot be
#: predicted there); Platt scaling's inner 3-fold CV and early stopping's stratified hold-out need 3
MIN_TRAIN_CELLS = 3


def _drop_classes_rare_in_training(table: pd.DataFrame, n_splits: int, notes: list[str]) -> None:
    """Leave out a class with 1 or 2 cells in some fold's training part (grouped splits can do that)."""
    fold = table["test_fold"].to_numpy()
    used = fold != keys.EXCLUDED
    y = table["target"].to_numpy()
    for cls in sorted(set(y[used])):
        is_cls = used & (y == cls)
        for k in range(n_splits):
            n = int((is_cls & (fold != k)).sum())
            if 0 < n < MIN_TRAIN_CELLS:
                _exclude(table, is_cls, f"class with {n} training cells in fold {k}")
                notes.append(f"class '{cls}' has {n} cells in the training part of fold {k} (< {MIN_TRAIN_CELLS}) and is left out")
                break


def _at_least_two_classes(table, dataset, task, target, counts) -> None:
    n_classes = table.loc[table["test_fold"] != keys.EXCLUDED, "target"].nunique()
    if n_classes < 2:
        only = counts.index[0] if len(counts) else "none"
        raise TaskError(dataset, task, f"target '{target}' has {n_classes} class with enough cells ('{only}'); at least 2 are needed")


def _exclude(table: pd.DataFrame, mask: np.ndarray, reason: str) -> None:
    fresh = mask & (table["test_fold"].to_numpy() != keys.EXCLUDED)
    table.loc[fresh, "test_fold"] = keys.EXCLUDED
    table.loc[fresh, "excluded"] = reason


def make_folds(
    obs: pd.DataFrame,
    *,
    dataset: str,
    task: str,
    target: str,
    kind: str = keys.CLASSIFICATION,
    scheme: str = "auto",
    n_splits: int = 5,
    group_key: str = keys.DONOR,
    train_batches: list[str] | tuple[str, ...] = (),
    test_batches: list[str] | tuple[str, ...] = (),
    seed: int = 0,
) -> Folds:
    """Check the target and assign every cell to a fold.

    Schemes: ``stratified`` (cell-level k-fold, stratified by class), ``grouped`` (k-fold with
    all cells of a group, by default the donor, on one side; stratified by class as far as the
    groups allow), ``leave_one_batch_out``, ``batches`` (train on ``train_batches``, test on
    ``test_batches``, one split) and ``auto`` (grouped when ``obs[group_key]`` has at least two
    groups, else stratified).

    Fallbacks (logged, listed in ``notes``): cells without a target are left out of the
    evaluation (the final model still predicts them); for k-fold schemes a class with fewer cells
    than folds is left out; with fewer groups than folds the folds are reduced to one per group.
    """
    from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold

    if scheme not in keys.SPLIT_SCHEMES:
        raise TaskError(dataset, task, f"unknown split scheme '{scheme}' (one of {list(keys.SPLIT_SCHEMES)})")
    y = _target(obs, dataset, task, target, kind)
    table = pd.DataFrame({"target": y, "group": None, "test_fold": 0, "excluded": ""}, index=obs.index.astype(str))
    notes: list[str] = []
    missing = y.isna().to_numpy()
    if missing.all():
        raise TaskError(dataset, task, f"target '{target}' has no values")
    if missing.any():
        _exclude(table, missing, "missing target")
        notes.append(f"{int(missing.sum())} cells without a '{target}' value are left out of the evaluation")

    if scheme == "auto":
        has_groups = group_key in obs.columns and obs[group_key].dropna().nunique() >= 2
        scheme = "grouped" if has_groups else "stratified"
        if not has_groups:
            notes.append(f"no '{group_key}' groups: the folds split single cells (or images), so the scores may be "
                         "optimistic for a new experiment")
    groups_col = {"grouped": group_key, "leave_one_batch_out": keys.BATCH, "batches": keys.BATCH}.get(scheme)
    if groups_col is not None:
        if groups_col not in obs.columns:
            what = "a batch_key" if groups_col == keys.BATCH else f"an obs column '{groups_col}' (its donor_key)"
            raise TaskError(dataset, task, f"split '{scheme}' needs {what}")
        g = obs[groups_col].astype("string").astype(object)
        table["group"] = g.where(obs[groups_col].notna(), None).to_numpy()
        no_group = table["group"].isna().to_numpy()
        if no_group.any():
            _exclude(table, no_group, f"missing {groups_col}")
            notes.append(f"{int(no_group.sum())} cells without a '{groups_col}' value are left out")

    def fewer_groups(n_splits: int) -> int:
        n_groups = table.loc[table["test_fold"] != keys.EXCLUDED, "group"].nunique()
        if n_groups < 2:
            raise TaskError(dataset, task, f"split 'grouped' needs at least 2 groups in '{group_key}' (found {n_groups})")
        if n_groups < n_splits:
            notes.append(f"only {n_groups} groups in '{group_key}': {n_groups} folds instead of {n_splits}")
        return min(n_splits, n_groups)

    if scheme == "grouped":
        n_splits = fewer_groups(n_splits)
    kfold = scheme in ("stratified", "grouped")
    if kind == keys.CLASSIFICATION:
        min_cells = n_splits if kfold else 2
        used = table["test_fold"] != keys.EXCLUDED
        counts = table.loc[used, "target"].value_counts()
        for cls, n in counts[counts < min_cells].items():
            _exclude(table, (table["target"] == cls).to_numpy(), f"class with {n} cells")
            notes.append(f"class '{cls}' has {n} cells (< {min_cells}) and is left out")
        _at_least_two_classes(table, dataset, task, target, counts)
        if scheme == "grouped":  # dropping cells can empty a donor
            n_splits = fewer_groups(n_splits)

    used = np.flatnonzero(table["test_fold"].to_numpy() != keys.EXCLUDED)
    yu = table["target"].to_numpy()[used]
    gu = table["group"].to_numpy()[used]
    if scheme == "batches":
        train_b, test_b = [str(b) for b in train_batches], [str(b) for b in test_batches]
        present = set(gu)
        for name, chosen in (("train_batches", train_b), ("test_batches", test_b)):
            if not chosen:
                raise TaskError(dataset, task, f"split 'batches' needs split.{name}")
            absent = sorted(set(chosen) - present)
            if absent:
                raise TaskError(dataset, task, f"split.{name} {absent} not among the batches {sorted(present)}")
        if set(train_b) & set(test_b):
            raise TaskError(dataset, task, f"batches {sorted(set(train_b) & set(test_b))} are in both train_batches and test_batches")
        fold = np.full(len(used), keys.EXCLUDED)
        fold[np.isin(gu, train_b)] = keys.TRAIN_ONLY
        fold[np.isin(gu, test_b)] = 0
        other = fold == keys.EXCLUDED
        table.loc[table.index[used[other]], "excluded"] = "batch in neither train_batches nor test_batches"
        table.iloc[used, table.columns.get_loc("test_fold")] = fold
        n_splits = 1
        if kind == keys.CLASSIFICATION:
            unseen = sorted(set(yu[fold == 0]) - set(yu[fold == keys.TRAIN_ONLY]))
            if unseen:
                notes.append(f"classes only in the test batches cannot be predicted: {unseen}")
    else:
        if scheme == "leave_one_batch_out":
            n_groups = len(set(gu))
            if n_groups < 2:
                raise TaskError(dataset, task, f"split 'leave_one_batch_out' needs at least 2 batches (found {n_groups})")
            splitter, n_splits = LeaveOneGroupOut(), n_groups
        else:
            if len(used) < n_splits:
                raise TaskError(dataset, task, f"{len(used)} cells cannot be split into {n_splits} folds")
            if scheme == "grouped":
                splitter = (StratifiedGroupKFold if kind == keys.CLASSIFICATION else GroupKFold)(
                    n_splits=n_splits, shuffle=True, random_state=seed
                )
            else:
                splitter = (StratifiedKFold if kind == keys.CLASSIFICATION else KFold)(
                    n_splits=n_splits, shuffle=True, random_state=seed
                )
        fold = np.empty(len(used), dtype=int)
        stratify = yu if kind == keys.CLASSIFICATION else None
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(used)), stratify, gu if groups_col else None)):
            fold[test] = k
        table.iloc[used, table.columns.get_loc("test_fold")] = fold
    table["test_fold"] = table["test_fold"].astype(int)

    if kind == keys.CLASSIFICATION:
        _drop_classes_rare_in_training(table, n_splits, notes)
        _at_least_two_classes(table, dataset, task, target, table["target"].value_counts())
    folds = Folds(table, kind, scheme, n_splits, groups_col, notes)
    for k, (train, test) in enumerate(folds.splits()):
        if len(train) == 0 or len(test) == 0:
            raise TaskError(dataset, task, f"fold {k} of split '{scheme}' has an empty train or test set")
        if kind == keys.CLASSIFICATION and table["target"].iloc[train].nunique() < 2:
            raise TaskError(dataset, task, f"fold {k} of split '{scheme}' has a single class in its training set")
    for note in notes:
        log.warning("dataset %s, task %s: %s", dataset, task, note)
    return folds
