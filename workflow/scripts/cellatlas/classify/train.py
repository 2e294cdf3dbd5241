"""The classify stage's entries: a task's split, one model's evaluation, the models' comparison."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellatlas import keys, naming, plotting
from cellatlas.classify import evaluate as ev
from cellatlas.classify.compare import compare
from cellatlas.classify.features import build_pipeline
from cellatlas.classify.models import get_kind, make_estimator
from cellatlas.classify.splits import Folds
from cellatlas.errors import CellAtlasError, TaskError
from cellatlas.stage import DatasetInput, Model, Result, plot

log = logging.getLogger(__name__)


def model_pipeline(model: Mapping[str, Any], features: Mapping[str, Any], *, kind: str, n_genes: int, n_train_min: int,
                   threads: int = 1, seed: int = 0):
    """The unfitted pipeline of a config model entry, with PCA components capped to what the data allow."""
    spec = get_kind(model["kind"], kind)
    if spec.images:  # the rows are images: no gene selection, scaling or PCA in front of the network
        from sklearn.pipeline import Pipeline

        return Pipeline([("model", make_estimator(model["kind"], kind, model.get("params"), n_jobs=threads,
                                                  seed=seed))]), spec
    n_sel = min(features["n_genes"], n_genes) if features["genes"] != "all" else n_genes
    n_pcs = max(1, min(features["n_pcs"], n_sel - 1, n_train_min - 1))  # arpack needs fewer than both
    params = dict(model.get("params") or {})
    if model["kind"] == "knn":
        k = params.get("n_neighbors", spec.defaults["n_neighbors"])
        if k > n_train_min:
            log.warning("knn: n_neighbors %d > %d cells in the smallest training fold; using %d", k, n_train_min, n_train_min)
            params["n_neighbors"] = n_train_min
    estimator = make_estimator(model["kind"], kind, params, n_jobs=threads, seed=seed)
    return build_pipeline(
        estimator, task=kind, input=model.get("input", "genes"), genes=features["genes"], n_genes=features["n_genes"],
        scale=features["scale"], n_pcs=n_pcs, dense=not spec.sparse, seed=seed,
    ), spec


def read_matrix(h5ad: str):
    """``X`` with cell and gene names, and nothing else of the file (its counts layer is as large as X)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as fh:
        X = read_elem(fh["X"])
        obs_names = pd.Index(read_elem(fh["obs"]).index.astype(str))
        var_names = pd.Index(read_elem(fh["var"]).index.astype(str))
    return X, obs_names, var_names


def image_shape_of(h5ad: str) -> tuple[int, int, int] | None:
    """(channels, height, width) of an image dataset's rows; None for an expression dataset."""
    import h5py
    from anndata.io import read_elem

    from cellatlas.images import IMAGE_KEY, SHAPE_KEY

    with h5py.File(h5ad, "r") as fh:
        node = fh.get(f"uns/{keys.UNS_KEY}/{IMAGE_KEY}/{SHAPE_KEY}")
        return None if node is None else tuple(int(v) for v in read_elem(node))


def split_stage(h5ad: str, *, dataset: str, task: str, spec: Mapping[str, Any], seed: int = 0) -> Result:
    """The classify_split rule: check the task's target and fix its folds, shared by every model."""
    import anndata as ad

    from cellatlas.classify.splits import make_folds

    obs = ad.read_h5ad(h5ad, backed="r").obs  # obs only: the matrix is not needed here
    split = spec["split"]
    folds = make_folds(
        obs, dataset=dataset, task=task, target=spec["target"], kind=spec["kind"], scheme=split["scheme"],
        n_splits=split["n_splits"], group_key=split["group_key"], train_batches=split["train_batches"],
        test_batches=split["test_batches"], seed=seed,
    )
    summary = folds.summary()
    return Result(metrics={k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
                  tables={"folds": folds.table.reset_index(names="cell")}, records={"meta": summary},
                  inputs=[DatasetInput(dataset, h5ad)], not_logged={"folds"},
                  notes=[f"dataset '{dataset}', task '{task}': {n}" for n in folds.notes])


def model_stage(
    *,
    h5ad: str,
    folds: str,
    meta: str,
    dataset: str,
    task: str,
    model_name: str,
    model: Mapping[str, Any],
    features: Mapping[str, Any],
    importance: Mapping[str, Any],
    seed: int = 0,
    threads: int = 1,
    trainer: Mapping[str, Any] | None = None,
    tracking: Mapping[str, str] | None = None,
    workspace: str | Path | None = None,
) -> Result:
    """Cross-validate, refit and describe one model of a task (the classify/regress model rules).

    ``threads`` goes to the estimators' ``n_jobs``; the caller holds BLAS/OpenMP pools to it.
    A deep model (``cellatlas.deep``) also gets ``trainer`` (its execution settings) and the
    donors of the training cells (whole donors make its validation set); the final fit streams
    its training curves into the ``tracking`` run (``curve/<metric>``, the epoch as step) and
    leaves its best-epoch checkpoint in ``workspace`` (result entry ``checkpoint``).
    """
    import tempfile
    import time

    import scipy.sparse as sp

    f = Folds.read(folds, meta)
    X, obs_names, var_names = read_matrix(h5ad)
    if not obs_names.equals(pd.Index(f.table.index)):
        raise TaskError(dataset, task, f"the cells of '{h5ad}' differ from those of its folds '{folds}'; rerun the split")
    X = X.tocsr() if sp.issparse(X) else np.asarray(X)
    if sp.issparse(X) and X.dtype != np.float32:
        X = X.astype(np.float32)
    n_train_min = min(len(tr) for tr, _ in f.splits())
    pipe, spec = model_pipeline(model, features, kind=f.kind, n_genes=X.shape[1], n_train_min=n_train_min,
                                threads=threads, seed=seed)
    shape = image_shape_of(h5ad)
    if spec.images != (shape is not None):
        raise TaskError(dataset, task, f"model '{model_name}' ({model['kind']}) "
                                       + ("reads images; this dataset has genes" if spec.images else
                                          "reads genes; this dataset has images"))
    if shape is not None:
        pipe.set_params(model__image_shape=list(shape))
    log.info("%s/%s/%s: %s split, %d folds, pipeline %s", dataset, task, model_name, f.scheme, f.n_splits,
             [name for name, _ in pipe.steps])

    fit_params = None
    checkpoint = Path(workspace or tempfile.mkdtemp(prefix="cellatlas-model-")) / "model.ckpt"
    if spec.deep:
        # the folds' fits are in the log and folds.tsv; the final fit's curves stream into the run
        pipe.set_params(model__trainer=dict(trainer or {}), model__tracking=None)
        groups = f.table["group"].to_numpy() if f.table["group"].notna().any() else None

        def fit_params(label: str, rows: np.ndarray) -> dict[str, Any]:
            out = {"model__groups": None if groups is None else groups[rows], "model__log_prefix": label}
            if label == "final":
                out.update(model__checkpoint=str(checkpoint), model__log_prefix=naming.CURVE)
            return out

    try:
        cv = ev.cross_validate(X, f, pipe, fit_params)
    except CellAtlasError as e:
        raise TaskError(dataset, task, f"model '{model_name}': {e}") from None
    if spec.deep:
        epochs = pd.DataFrame([p.named_steps["model"].fit_summary_ for p in cv.fitted])
        for col in ("epochs", "best_epoch", "train_seconds"):
            cv.folds[col] = epochs[col].to_numpy()
    metrics = keys.CLASSIFICATION_METRICS if f.kind == keys.CLASSIFICATION else keys.REGRESSION_METRICS
    scores = {m: cv.folds[m].to_numpy(dtype=float) for m in metrics}
    primary = keys.PRIMARY_METRIC[f.kind]
    result = Result(cv=scores, tables={"folds": cv.folds}, inputs=[DatasetInput(dataset, h5ad, context="training")],
                    metrics={"split": f.scheme, "n_folds": f.n_splits, "model_kind": model["kind"],
                             f"{naming.TIME}/cv_fit_seconds": float(cv.folds["fit_seconds"].sum())},
                    not_logged={"predictions"})
    title = f"{dataset} {task}: {model_name} ({f.scheme}, {f.n_splits} folds)\n{primary} {scores[primary].mean():.3f}"
    if f.kind == keys.CLASSIFICATION:
        classes, confusion = ev.per_class(f, cv)
        result.tables.update(per_class=classes, confusion=confusion.reset_index(names=confusion.index.name or ""))
        result.figures["figure"] = plot(plotting.confusion, confusion, title=title)
    else:
        tested = f.table["test_fold"].to_numpy() >= 0
        result.figures["figure"] = plot(plotting.predicted_vs_measured, f.table["target"].to_numpy(dtype=float)[tested],
                                        cv.predictions["prediction"].to_numpy(dtype=float)[tested], title=title)

    if spec.deep and tracking:
        pipe.set_params(model__tracking=dict(tracking))
    t0 = time.perf_counter()
    try:
        final = ev.fit_final(X, f, pipe, fit_params)
    except CellAtlasError as e:
        raise TaskError(dataset, task, f"model '{model_name}' (final fit): {e}") from None
    predictions = ev.final_predictions(X, f, final, cv)
    predictions.index.name = "cell"
    if (ece := ev.calibration_error(f, cv)) is not None:
        result.metrics["ece"] = ece
    t1 = time.perf_counter()
    genes = ev.importance(
        X, f, final, cv, method=spec.importance, gene_names=var_names, n_top=importance.get("n_genes", 25),
        max_cells=importance.get("max_cells", 1000), n_repeats=importance.get("n_repeats", 3),
        candidates=importance.get("candidates", 50), seed=seed,
    )
    t2 = time.perf_counter()
    log.info("final model %.1f s, importance (%s) %.1f s", t1 - t0, genes["method"].iloc[0] if len(genes) else "-", t2 - t1)
    result.tables.update(predictions=predictions.reset_index(), importance=genes)
    result.metrics.update({f"{naming.TIME}/final_fit_seconds": t1 - t0, f"{naming.TIME}/importance_seconds": t2 - t1})
    example = X[:5]
    example = np.asarray(example.toarray() if sp.issparse(example) else example, dtype=np.float32)
    result.models["model"] = Model(final, input_example=example, requirements=("torch", "lightning") if spec.deep else ())
    if spec.deep:
        summary = final.named_steps["model"].fit_summary_
        result.metrics.update(naming.fit_metrics(summary))
        result.files["checkpoint"] = checkpoint
    return result


def compare_stage(
    *,
    fold_paths: Mapping[str, str],
    records: Mapping[str, str],
    meta: str,
    dataset: str,
    task: str,
    test: str = "corrected_ttest",
    alpha: float = 0.05,
) -> Result:
    """The classify_compare rule: rank the task's models and test every pair on the shared folds."""
    info = json.loads(Path(meta).read_text())
    tables = {m: pd.read_csv(p, sep="\t") for m, p in fold_paths.items()}
    model_metrics = {m: json.loads(Path(r).read_text()).get("metrics", {}) for m, r in records.items()}
    ece = {m: float(v["ece"]) for m, v in model_metrics.items() if v.get("ece") is not None}
    table, pairwise, summary = compare(tables, kind=info["kind"], test=test, alpha=alpha, ece=ece)
    front = {"dataset": dataset, "task": task, "kind": info["kind"], "split": info["split"],
             "group_key": info["group_key"]}
    for i, (k, v) in enumerate(front.items()):
        table.insert(i, k, v)
    table["test"] = summary["test"]
    table["conclusion"] = summary["conclusion"]
    log.info("%s", summary["conclusion"])
    metric = summary["metric"]
    best = table.iloc[0]
    metrics = {"best_model": summary["best_model"], "split": info["split"], "conclusion": summary["conclusion"],
               naming.best_cv(metric): float(best[f"{metric}_mean"])}
    if len(table) > 1:  # how far ahead the best model is of the next one
        metrics[naming.margin(metric)] = float(best[f"{metric}_mean"] - table.iloc[1][f"{metric}_mean"])
    table["run_id"] = [json.loads(Path(records[m]).read_text())["run_id"] for m in table["model"]]
    uri = json.loads(Path(records[summary["best_model"]]).read_text()).get("model_uri")
    return Result(
        metrics=metrics, tables={"table": table, "pairwise": pairwise},
        register={naming.registered_model(dataset, task): uri} if uri else {},
        figures={"figure": plot(plotting.fold_scores, tables, metric,
                                title=f"{dataset} {task}: {info['split']} split, {summary['n_folds']} folds")},
    )
