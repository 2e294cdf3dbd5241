"""Models of the classify stage: no leakage, metrics, regression, comparison, outputs."""

import json

import joblib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin

from cellatlas import keys
from cellatlas.classify import evaluate as ev
from cellatlas.classify.compare import compare, corrected_ttest, holm
from cellatlas.classify.features import GeneSelector, build_pipeline, hvg_scores
from cellatlas.classify.models import KINDS, check_params, make_estimator
from cellatlas.classify.splits import make_folds
from cellatlas.classify.train import compare_stage, model_pipeline, model_stage
from cellatlas.runner import write_result
from cellatlas.stage import check_outputs

FEATURES = {"genes": "hvg", "n_genes": 300, "scale": True, "n_pcs": 20}
IMPORTANCE = {"n_genes": 10, "max_cells": 200, "n_repeats": 2, "candidates": 20}

#: rows each Recorder saw at fit, by tag (clone() copies parameters, so the record is global)
FITTED_ROWS: dict[str, list[set[int]]] = {}


class Recorder(TransformerMixin, BaseEstimator):
    """Passes X through; remembers which rows it was fitted on (their ids, / 1000, sit in column 0)."""

    def __init__(self, tag: str = ""):
        self.tag = tag

    def fit(self, X, y=None):
        ids = X[:, 0].toarray().ravel() if sp.issparse(X) else X[:, 0]
        FITTED_ROWS.setdefault(self.tag, []).append(set(np.rint(ids * 1000).astype(int) - 1))
        return self

    def transform(self, X):
        return X


def _lognorm(adata):
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = adata.X.astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def sim():
    from cellatlas.simulate import simulate_counts

    return _lognorm(simulate_counts(n_cells=900, n_genes=600, n_types=4, n_donors=6, n_batches=2, seed=5,
                                    program_genes=30))


@pytest.mark.parametrize("input_", ["genes", "pca"])
def test_every_fitted_step_sees_only_training_rows(sim, input_):
    X = sim.X.tocsr().copy()
    X = sp.hstack([sp.csr_matrix(np.arange(1, X.shape[0] + 1, dtype=np.float32)[:, None] / 1000), X], format="csr")
    folds = make_folds(sim.obs, dataset="sim", task="t", target="cell_type", scheme="grouped", n_splits=3)
    pipe = build_pipeline(make_estimator("logistic_regression", keys.CLASSIFICATION), task=keys.CLASSIFICATION,
                          input=input_, n_genes=200, n_pcs=10)
    tag = f"leak-{input_}"
    pipe.steps.insert(0, ("recorder", Recorder(tag)))
    cv = ev.cross_validate(X, folds, pipe)
    seen = FITTED_ROWS[tag]
    assert len(seen) == 3
    for rows, (train, test) in zip(seen, folds.splits()):
        assert rows == set(train.tolist())
        assert rows.isdisjoint(test.tolist())
    # and each fold's own gene selection was fitted on exactly its training rows
    for fitted, (train, _) in zip(cv.fitted, folds.splits()):
        assert fitted.named_steps["select"].n_rows_fitted_ == len(train)


def test_selection_inside_folds_keeps_noise_at_chance_where_outside_would_not():
    """Random labels on pure noise: selecting genes on all cells first (the classic leak) scores
    far above chance; the pipeline's in-fold selection stays at chance."""
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, g = 120, 3000
    X = sp.csr_matrix(rng.normal(size=(n, g)).astype(np.float32))
    obs = pd.DataFrame({"label": rng.choice(["x", "y"], n)}, index=[f"c{i}" for i in range(n)])
    folds = make_folds(obs, dataset="noise", task="t", target="label", scheme="stratified", n_splits=5)
    honest = build_pipeline(LogisticRegression(C=1.0), task=keys.CLASSIFICATION, genes="anova", n_genes=20, scale=False)
    honest_acc = ev.cross_validate(X, folds, honest).aggregate()["accuracy_mean"]
    chosen = SelectKBest(f_classif, k=20).fit(X, obs["label"]).get_support()
    leaky = build_pipeline(LogisticRegression(C=1.0), task=keys.CLASSIFICATION, genes="all", scale=False)
    leaky_acc = ev.cross_validate(X[:, chosen], folds, leaky).aggregate()["accuracy_mean"]
    assert honest_acc < 0.65
    assert leaky_acc > 0.8


def test_hvg_selector_prefers_overdispersed_genes():
    rng = np.random.default_rng(1)
    rates = np.exp(rng.normal(0.0, 1.0, 1000))
    counts = rng.poisson(rates, size=(400, 1000)).astype(float)
    noisy = [10, 200, 400, 600, 800]  # same mean, but on in some cells and off in others
    counts[:, noisy] = rng.poisson(rates[noisy] * rng.choice([0.1, 1.9], size=(400, len(noisy))))
    X = sp.csr_matrix(np.log1p(counts))
    top = np.argsort(-hvg_scores(X))[:10]
    assert set(noisy) <= set(top)
    dense = hvg_scores(X.toarray())
    assert np.allclose(hvg_scores(X), dense)
    from cellatlas.classify import features

    mean, var = features._expm1_mean_var(X)
    assert np.allclose(mean, np.expm1(X.toarray()).mean(axis=0))
    assert np.allclose(var, np.expm1(X.toarray()).var(axis=0, ddof=1))
    sel = GeneSelector(method="hvg", n_genes=10).fit(X)
    assert set(noisy) <= set(sel.support_) and len(sel.support_) == 10
    assert sel.transform(X).shape == (400, 10)


@pytest.mark.parametrize("name", sorted(k for k, m in KINDS.items() if not m.images))  # images: test_images*
def test_every_model_kind_runs_cross_validation(sim, name):
    kind_name, task = name.split(":")
    target = "cell_type" if task == keys.CLASSIFICATION else "program"
    folds = make_folds(sim.obs, dataset="sim", task="t", target=target, kind=task, scheme="grouped", n_splits=3)
    model = {"kind": kind_name, "input": "pca" if kind_name in ("knn", "hist_gradient_boosting") else "genes"}
    params = {"n_estimators": 30} if kind_name == "random_forest" else {"max_iter": 30} if kind_name == "hist_gradient_boosting" else {}
    model["params"] = params
    pipe, spec = model_pipeline(model, FEATURES, kind=task, n_genes=sim.n_vars, n_train_min=500)
    cv = ev.cross_validate(sim.X.tocsr(), folds, pipe)
    agg = cv.aggregate()
    if task == keys.CLASSIFICATION:
        assert set(cv.folds.columns) >= set(keys.CLASSIFICATION_METRICS)
        assert agg["macro_f1_mean"] > 0.8, agg
        probs = cv.predictions.filter(like="prob_").to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0)
    else:
        assert set(cv.folds.columns) >= set(keys.REGRESSION_METRICS)
        assert agg["r2_mean"] > 0.3, agg
    final = ev.fit_final(sim.X.tocsr(), folds, pipe)
    table = ev.importance(sim.X.tocsr(), folds, final, cv, method=spec.importance, gene_names=sim.var_names,
                          **{k: v for k, v in IMPORTANCE.items() if k != "n_genes"}, n_top=5)
    assert len(table) >= 5 and table["gene"].isin(sim.var_names).all()
    assert set(table["method"]) <= {"coef", "impurity", "permutation"}


def test_grouped_split_scores_lower_than_cell_split_when_donors_differ():
    from cellatlas.simulate import simulate_counts

    adata = _lognorm(simulate_counts(n_cells=1500, n_genes=1500, n_types=5, n_donors=6, n_batches=2, seed=1,
                                     marker_lfc=0.4, donor_type_sd=0.3))
    score = {}
    for scheme in ("stratified", "grouped"):
        folds = make_folds(adata.obs, dataset="sim", task="t", target="cell_type", scheme=scheme, seed=0)
        pipe, _ = model_pipeline({"kind": "logistic_regression"}, {**FEATURES, "n_genes": 1000},
                                 kind=keys.CLASSIFICATION, n_genes=adata.n_vars, n_train_min=1000)
        score[scheme] = ev.cross_validate(adata.X.tocsr(), folds, pipe).aggregate()["macro_f1_mean"]
    assert score["grouped"] < score["stratified"] - 0.05, score


def test_corrected_ttest_and_holm_match_hand_computation():
    diff = np.array([0.02, 0.03, 0.01, 0.04, 0.02])
    t, p, df = corrected_ttest(diff, n_train=800, n_test=200)
    expected = diff.mean() / np.sqrt((1 / 5 + 200 / 800) * diff.var(ddof=1))
    assert t == pytest.approx(expected) and df == 4
    from scipy import stats

    assert p == pytest.approx(2 * stats.t.sf(expected, 4))
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def _fold_table(values, n_train=800, n_test=200):
    return pd.DataFrame({"fold": range(len(values)), "n_train": n_train, "n_test": n_test, "accuracy": values,
                         "balanced_accuracy": values, "macro_f1": values, "fit_seconds": 1.0})


def test_compare_separates_real_from_noise_differences():
    good = _fold_table([0.95, 0.96, 0.94, 0.95, 0.96])
    same = _fold_table([0.951, 0.955, 0.941, 0.952, 0.958])
    bad = _fold_table([0.60, 0.62, 0.61, 0.59, 0.60])
    table, pairwise, summary = compare({"bad": bad, "good": good, "same": same}, kind=keys.CLASSIFICATION)
    assert list(table["model"]) == ["good", "same", "bad"] and list(table["rank"]) == [1, 2, 3]
    by = table.set_index("model")
    assert bool(by.loc["bad", "worse_than_best"]) and not bool(by.loc["same", "worse_than_best"])
    assert summary["best_model"] == "good" and "Nadeau" in summary["test"]
    assert "its difference to same is not significant" in summary["conclusion"]
    assert set(pairwise["test"]) == {"corrected_ttest"} and len(pairwise) == 3
    _, pw, s = compare({"good": good, "bad": bad}, kind=keys.CLASSIFICATION, test="wilcoxon")
    assert "Wilcoxon" in s["test"] and pw["p_value"].iloc[0] == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="not evaluated on the same folds"):
        compare({"a": good, "b": _fold_table([0.9] * 5, n_test=150)}, kind=keys.CLASSIFICATION)


def test_wrong_model_params_are_named():
    with pytest.raises(ValueError, match="'Cx' is not a parameter of logistic_regression"):
        check_params("logistic_regression", keys.CLASSIFICATION, {"Cx": 1})
    with pytest.raises(ValueError, match="'C' parameter of LogisticRegression must be a float"):
        check_params("logistic_regression", keys.CLASSIFICATION, {"C": "high"})
    check_params("linear_svm", keys.CLASSIFICATION, {"C": 0.1, "cv": 5})


def _write_task(sim, tmp_path, *, target, kind, scheme="grouped"):
    h5ad = tmp_path / "normalize.h5ad"
    sim.write_h5ad(h5ad)
    folds = make_folds(sim.obs, dataset="sim", task="t", target=target, kind=kind, scheme=scheme, n_splits=3)
    folds.write(tmp_path / "folds.tsv.gz", tmp_path / "task.json")
    return h5ad


@pytest.mark.parametrize("kind", [keys.CLASSIFICATION, keys.REGRESSION])
def test_model_stage_gives_every_output_and_is_deterministic(sim, tmp_path, kind):
    target = "cell_type" if kind == keys.CLASSIFICATION else "program"
    model = {"kind": "logistic_regression" if kind == keys.CLASSIFICATION else "ridge", "input": "genes", "params": {}}
    sim = sim.copy()
    sim.obs.loc[sim.obs_names[:4], target] = None if kind == keys.CLASSIFICATION else np.nan
    h5ad = _write_task(sim, tmp_path, target=target, kind=kind)
    results = []
    for rep in range(2):
        out = tmp_path / f"rep{rep}"
        out.mkdir()
        names = ["folds", "figure", "predictions", "importance", "model"]
        if kind == keys.CLASSIFICATION:
            names += ["per_class", "confusion"]
        ext = {"figure": "png", "predictions": "tsv.gz", "model": "joblib"}
        outputs = {n: str(out / f"{n}.{ext.get(n, 'tsv')}") for n in names}
        result = model_stage(h5ad=str(h5ad), folds=str(tmp_path / "folds.tsv.gz"), meta=str(tmp_path / "task.json"),
                             dataset="sim", task="t", model_name="m", model=model,
                             features=FEATURES, importance=IMPORTANCE, seed=0)
        check_outputs(result, {**outputs, "run": "run.json"}, where="test")  # one entry per declared output
        write_result(result, outputs)
        results.append((result, outputs))
    (s1, o1), (s2, o2) = results
    metrics = keys.CLASSIFICATION_METRICS if kind == keys.CLASSIFICATION else keys.REGRESSION_METRICS
    assert s1.metrics["split"] == "grouped" and s1.metrics["n_folds"] == 3
    assert set(s1.cv) == set(metrics)  # the same metric names for every model kind
    for m in metrics:
        assert len(s1.cv[m]) == 3
        np.testing.assert_array_equal(s1.cv[m], s2.cv[m])
    pred = pd.read_csv(o1["predictions"], sep="\t", index_col="cell")
    assert len(pred) == sim.n_obs
    assert set(pred["source"]) == {"out_of_fold", "final_model"}
    assert (pred.loc[sim.obs_names[:4], "source"] == "final_model").all()  # no target: predicted, not scored
    assert pred["prediction"].notna().all()
    pd.testing.assert_frame_equal(pred, pd.read_csv(o2["predictions"], sep="\t", index_col="cell"))
    model_back = joblib.load(o1["model"])
    assert len(model_back.predict(sim.X[:3])) == 3
    assert open(o1["figure"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if kind == keys.CLASSIFICATION:
        per_class = pd.read_csv(o1["per_class"], sep="\t")
        assert set(per_class["class"]) == set(sim.obs["cell_type"].dropna().astype(str))
        confusion = pd.read_csv(o1["confusion"], sep="\t", index_col=0)
        assert confusion.to_numpy().sum() == (pred["source"] == "out_of_fold").sum()
        assert {f"prob_{c}" for c in per_class["class"]} <= set(pred.columns)


def test_compare_stage_gives_tables_naming_split_and_test(sim, tmp_path):
    _write_task(sim, tmp_path, target="cell_type", kind=keys.CLASSIFICATION)
    paths = {}
    for m, p in (("a", [0.9, 0.91, 0.92]), ("b", [0.5, 0.52, 0.51])):
        paths[m] = tmp_path / f"{m}.tsv"
        _fold_table(p).to_csv(paths[m], sep="\t", index=False)
    records = {}
    for m in paths:
        records[m] = tmp_path / f"{m}.json"
        records[m].write_text(json.dumps({"run_id": f"run-{m}", "model_uri": f"models:/m-{m}"}))
    outputs = {k: str(tmp_path / f"cmp_{k}.{'png' if k == 'figure' else 'tsv'}") for k in ("table", "pairwise", "figure")}
    result = compare_stage(fold_paths=paths, records=records, meta=str(tmp_path / "task.json"), dataset="sim", task="t")
    write_result(result, outputs)
    table = pd.read_csv(outputs["table"], sep="\t")
    assert list(table["model"]) == ["a", "b"] and set(table["split"]) == {"grouped"}
    assert list(table["run_id"]) == ["run-a", "run-b"]
    assert set(table["group_key"]) == {"donor"} and table["test"].str.contains("Nadeau").all()
    assert result.metrics["best_model"] == "a"
    assert result.metrics["best/cv/macro_f1"] == pytest.approx(0.91)
    assert result.metrics["best/macro_f1_margin"] == pytest.approx(0.91 - 0.51)
    assert result.register == {"cellatlas.sim.t": "models:/m-a"}  # the best model, under a stable name
    assert json.loads((tmp_path / "task.json").read_text())["split"] == "grouped"
