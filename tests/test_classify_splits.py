"""Split schemes and the target checks of the classify stage."""

import numpy as np
import pandas as pd
import pytest
from conftest import task_obs

from cellatlas import keys
from cellatlas.classify.splits import Folds, make_folds
from cellatlas.errors import TaskError


@pytest.fixture
def obs():
    return task_obs()


def _folds(obs, **kw):
    kw.setdefault("target", "label")
    return make_folds(obs, dataset="ds", task="t", **kw)


def test_stratified_puts_every_cell_in_one_test_fold_with_class_balance(obs):
    f = _folds(obs, scheme="stratified", n_splits=5)
    assert f.scheme == "stratified" and f.n_splits == 5
    tests = np.concatenate([test for _, test in f.splits()])
    assert sorted(tests) == list(range(len(obs)))
    overall = obs["label"].value_counts(normalize=True)
    for train, test in f.splits():
        assert set(train).isdisjoint(test) and len(train) + len(test) == len(obs)
        share = obs["label"].iloc[test].value_counts(normalize=True)
        assert np.allclose(share[overall.index], overall, atol=0.03)
    again = _folds(obs, scheme="stratified", n_splits=5)
    assert again.table["test_fold"].equals(f.table["test_fold"])


def test_grouped_keeps_each_donor_on_one_side_and_is_the_default_with_donors(obs):
    f = _folds(obs, scheme="auto", n_splits=3)
    assert f.scheme == "grouped" and f.group_key == "donor"
    for train, test in f.splits():
        assert set(obs["donor"].iloc[train]).isdisjoint(obs["donor"].iloc[test])
    assert _folds(obs.drop(columns="donor"), scheme="auto").scheme == "stratified"


def test_leave_one_batch_out_tests_each_batch_once(obs):
    f = _folds(obs, scheme="leave_one_batch_out")
    assert f.n_splits == 2
    tested = [set(obs["batch"].iloc[test]) for _, test in f.splits()]
    assert sorted(map(sorted, tested)) == [["b0"], ["b1"]]


def test_batches_scheme_trains_on_one_technology_and_tests_on_another(obs):
    obs = obs.copy()
    obs["batch"] = pd.Categorical([f"b{i % 3}" for i in range(len(obs))])
    f = _folds(obs, scheme="batches", train_batches=["b0"], test_batches=["b1"])
    ((train, test),) = f.splits()
    assert set(obs["batch"].iloc[train]) == {"b0"} and set(obs["batch"].iloc[test]) == {"b1"}
    assert (f.table.loc[obs["batch"] == "b2", "test_fold"] == keys.EXCLUDED).all()
    assert sorted(f.training_rows()) == sorted(train)
    with pytest.raises(TaskError, match=r"split.test_batches \['b9'\] not among the batches"):
        _folds(obs, scheme="batches", train_batches=["b0"], test_batches=["b9"])
    with pytest.raises(TaskError, match="in both train_batches and test_batches"):
        _folds(obs, scheme="batches", train_batches=["b0"], test_batches=["b0", "b1"])


def test_regression_folds_and_target_checks(obs):
    f = _folds(obs, target="program", kind=keys.REGRESSION, scheme="grouped")
    assert f.kind == keys.REGRESSION and f.classes == []
    for train, test in f.splits():
        assert set(obs["donor"].iloc[train]).isdisjoint(obs["donor"].iloc[test])
    with pytest.raises(TaskError, match=r"dataset 'ds', task 't': regression target 'label' is not numeric \(dtype category"):
        _folds(obs, target="label", kind=keys.REGRESSION)


def test_folds_roundtrip_through_files(obs, tmp_path):
    obs = obs.copy()
    obs.loc[obs.index[:5], "label"] = None
    f = _folds(obs, scheme="grouped", n_splits=3)
    f.write(tmp_path / "folds.tsv.gz", tmp_path / "task.json")
    back = Folds.read(tmp_path / "folds.tsv.gz", tmp_path / "task.json")
    assert back.table["test_fold"].equals(f.table["test_fold"])
    assert back.classes == f.classes and back.scheme == "grouped" and back.notes == f.notes
    assert back.table["target"].iloc[:5].isna().all()


def test_documented_fallbacks_are_logged_not_fatal(obs, caplog):
    obs = obs.copy()
    obs["label"] = obs["label"].astype(str)
    obs.iloc[:3, obs.columns.get_loc("label")] = "rare"  # 3 cells < 5 folds
    obs.iloc[3:10, obs.columns.get_loc("label")] = None
    f = _folds(obs, scheme="grouped", n_splits=10)  # only 6 donors
    assert f.n_splits == 6
    assert "rare" not in f.classes
    excluded = f.table.loc[f.table["test_fold"] == keys.EXCLUDED, "excluded"]
    assert (excluded.iloc[:3] == "class with 3 cells").all()
    assert (excluded.iloc[3:10] == "missing target").all()
    joined = " | ".join(f.notes)
    assert "only 6 groups in 'donor': 6 folds instead of 10" in joined
    assert "class 'rare' has 3 cells (< 6) and is left out" in joined
    assert "7 cells without a 'label' value" in joined
    assert "only 6 groups" in caplog.text
    assert f.summary()["cells_excluded"] == 10


def test_class_with_one_or_two_training_cells_in_a_fold_is_left_out(obs):
    """Platt scaling and early stopping cannot fit a class with 1-2 training cells; grouped folds can
    leave exactly that, so such a class is left out (logged) instead of failing the model jobs."""
    obs = obs.copy()
    obs["label"] = obs["label"].astype(str)
    d0 = np.flatnonzero(obs["donor"] == "d0")[:8]
    d1 = np.flatnonzero(obs["donor"] == "d1")[:2]
    obs.iloc[np.r_[d0, d1], obs.columns.get_loc("label")] = "rare"
    f = _folds(obs, scheme="grouped", n_splits=6)
    assert "rare" not in f.classes
    assert any("class 'rare' has 2 cells in the training part of fold" in n for n in f.notes)
    y = f.table["target"].to_numpy()
    for train, _ in f.splits():
        counts = pd.Series(y[train]).value_counts()
        assert (counts >= 3).all()


def test_integer_codes_keep_their_spelling_with_missing_values(obs):
    obs = obs.copy()
    obs["code"] = np.where(obs["label"] == "a", 1.0, 2.0)
    obs.iloc[0, obs.columns.get_loc("code")] = np.nan
    assert _folds(obs, target="code", scheme="stratified").classes == ["1", "2"]
