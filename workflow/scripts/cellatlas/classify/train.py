"""What a model job and a comparison job do, from files to files (the rules' scripts call these)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellatlas import keys, plotting
from cellatlas.classify import evaluate as ev
from cellatlas.classify.compare import compare
from cellatlas.classify.features import build_pipeline
from cellatlas.classify.models import get_kind, make_estimator
from cellatlas.classify.splits import Folds
from cellatlas.errors import CellAtlasError, TaskError

log = logging.getLogger(__name__)


def model_pipeline(model: Mapping[str, Any], features: Mapping[str, Any], *, kind: str, n_genes: int, n_train_min: int,
                   threads: int = 1, seed: int = 0):
    """The unfitted pipeline of a config model entry, with PCA components capped to what the data allow."""
    spec = get_kind(model["kind"], kind)
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


def train_model(
    *,
    h5ad: str,
    folds: str,
    meta: str,
    outputs: Mapping[str, str],
    dataset: str,
    task: str,
    model_name: str,
    model: Mapping[str, Any],
    features: Mapping[str, Any],
    importance: Mapping[str, Any],
    seed: int = 0,
    threads: int = 1,
    trainer: Mapping[str, Any] | None = None,
    run=None,
) -> dict[str, Any]:
    """Cross-validate, refit and describe one model; write every output; return the summary.

    ``threads`` goes to the estimators' ``n_jobs``; the caller holds BLAS/OpenMP pools to it.
    A deep model (``cellatlas.deep``) also gets ``trainer`` (its execution settings), the
    donors of the training cells (whole donors make its validation set), the stage's run (its
    epochs are logged live, as ``fold_<k>/<metric>`` and ``final/<metric>``) and, for the
    final model, ``outputs["checkpoint"]`` (the best epoch's Lightning checkpoint).
    """
    import time

    import joblib
    import scipy.sparse as sp

    f = Folds.read(folds, meta)
    wants_classes = "confusion" in outputs
    if wants_classes != (f.kind == keys.CLASSIFICATION):
        raise TaskError(dataset, task, f"is a {f.kind} task; its models are under results/{dataset}/{keys.TASK_DIRS[f.kind]}/")
    X, obs_names, var_names = read_matrix(h5ad)
    if not obs_names.equals(pd.Index(f.table.index)):
        raise TaskError(dataset, task, f"the cells of '{h5ad}' differ from those of its folds '{folds}'; rerun the split")
    X = X.tocsr() if sp.issparse(X) else np.asarray(X)
    if sp.issparse(X) and X.dtype != np.float32:
        X = X.astype(np.float32)
    n_train_min = min(len(tr) for tr, _ in f.splits())
    pipe, spec = model_pipeline(model, features, kind=f.kind, n_genes=X.shape[1], n_train_min=n_train_min,
                                threads=threads, seed=seed)
    log.info("%s/%s/%s: %s split, %d folds, pipeline %s", dataset, task, model_name, f.scheme, f.n_splits,
             [name for name, _ in pipe.steps])

    fit_params = None
    if spec.deep:
        pipe.set_params(model__trainer=dict(trainer or {}),
                        model__tracking={"uri": run.uri, "run_id": run.run_id} if run is not None and run.uri else None)
        groups = f.table["group"].to_numpy() if f.table["group"].notna().any() else None

        def fit_params(label: str, rows: np.ndarray) -> dict[str, Any]:
            out = {"model__groups": None if groups is None else groups[rows], "model__log_prefix": label}
            if label == "final" and "checkpoint" in outputs:
                out["model__checkpoint"] = outputs["checkpoint"]
            return out

    try:
        cv = ev.cross_validate(X, f, pipe, fit_params)
    except CellAtlasError as e:
        raise TaskError(dataset, task, f"model '{model_name}': {e}") from None
    if spec.deep:
        epochs = pd.DataFrame([p.named_steps["model"].fit_summary_ for p in cv.fitted])
        for col in ("epochs", "best_epoch", "train_seconds"):
            cv.folds[col] = epochs[col].to_numpy()
    cv.folds.to_csv(outputs["folds"], sep="\t", index=False)
    summary = {"split": f.scheme, "n_folds": f.n_splits, "model_kind": model["kind"], **cv.aggregate()}
    if run is not None:
        for row in cv.folds.to_dict("records"):
            run.log_metrics({f"fold_{m}": v for m, v in row.items() if m not in ("fold",)}, step=int(row["fold"]))
        run.log_metrics(summary)

    title = f"{dataset} {task}: {model_name} ({f.scheme}, {f.n_splits} folds)"
    if f.kind == keys.CLASSIFICATION:
        classes, confusion = ev.per_class(f, cv)
        classes.to_csv(outputs["per_class"], sep="\t", index=False)
        confusion.to_csv(outputs["confusion"], sep="\t")
        primary = keys.PRIMARY_METRIC[f.kind]
        plotting.confusion(confusion, outputs["figure"], title=f"{title}\n{primary} {summary[primary + '_mean']:.3f}")
    else:
        tested = f.table["test_fold"].to_numpy() >= 0
        plotting.predicted_vs_measured(
            f.table["target"].to_numpy(dtype=float)[tested], cv.predictions["prediction"].to_numpy(dtype=float)[tested],
            outputs["figure"], title=f"{title}\nR² {summary['r2_mean']:.3f}",
        )

    t0 = time.perf_counter()
    try:
        final = ev.fit_final(X, f, pipe, fit_params)
    except CellAtlasError as e:
        raise TaskError(dataset, task, f"model '{model_name}' (final fit): {e}") from None
    joblib.dump(final, outputs["model"])
    ev.final_predictions(X, f, final, cv).to_csv(outputs["predictions"], sep="\t", index_label="cell")
    t1 = time.perf_counter()
    genes = ev.importance(
        X, f, final, cv, method=spec.importance, gene_names=var_names, n_top=importance["n_genes"],
        max_cells=importance["max_cells"], n_repeats=importance["n_repeats"], candidates=importance["candidates"], seed=seed,
    )
    genes.to_csv(outputs["importance"], sep="\t", index=False)
    t2 = time.perf_counter()
    summary.update(final_fit_seconds=t1 - t0, importance_seconds=t2 - t1)
    log.info("final model %.1f s, importance (%s) %.1f s", t1 - t0, genes["method"].iloc[0] if len(genes) else "-", t2 - t1)

    if run is not None:
        for key in ("folds", "per_class", "confusion", "figure", "importance", "predictions"):
            if key in outputs:
                run.log_artifact(outputs[key])
        example = X[:5]
        example = np.asarray(example.toarray() if sp.issparse(example) else example, dtype=np.float32)
        import cellatlas

        uri = run.log_sklearn_model(final, input_example=example, output_example=final.predict(example),
                                    code_paths=[Path(cellatlas.__file__).parent],
                                    requirements=("torch", "lightning") if spec.deep else ())
        if spec.deep:
            run.log_metrics({f"final_{k}": v for k, v in final.named_steps["model"].fit_summary_.items()})
            if "checkpoint" in outputs:
                run.log_artifact(outputs["checkpoint"])
        run.log_metrics({"final_fit_seconds": t1 - t0, "importance_seconds": t2 - t1, "model_uri": uri})
        log.info("model logged as %s", uri)
    return summary


def compare_models(
    *,
    fold_paths: Mapping[str, str],
    meta: str,
    outputs: Mapping[str, str],
    dataset: str,
    task: str,
    test: str = "corrected_ttest",
    alpha: float = 0.05,
    run=None,
) -> dict[str, Any]:
    """Rank the task's models, test every pair on the shared folds, write the tables and figure."""
    info = json.loads(Path(meta).read_text())
    tables = {m: pd.read_csv(p, sep="\t") for m, p in fold_paths.items()}
    table, pairwise, summary = compare(tables, kind=info["kind"], test=test, alpha=alpha)
    front = {"dataset": dataset, "task": task, "kind": info["kind"], "split": info["split"],
             "group_key": info["group_key"]}
    for i, (k, v) in enumerate(front.items()):
        table.insert(i, k, v)
    table["test"] = summary["test"]
    table["conclusion"] = summary["conclusion"]
    table.to_csv(outputs["table"], sep="\t", index=False)
    pairwise.to_csv(outputs["pairwise"], sep="\t", index=False)
    plotting.fold_scores(tables, summary["metric"], outputs["figure"],
                         title=f"{dataset} {task}: {info['split']} split, {summary['n_folds']} folds")
    log.info("%s", summary["conclusion"])
    if run is not None:
        from cellatlas.tracking import log_to_parent

        best = table.iloc[0]
        run.log_metrics({"best_model": summary["best_model"], "split": info["split"], "conclusion": summary["conclusion"],
                         f"best_{summary['metric']}_mean": float(best[f"{summary['metric']}_mean"])})
        for key in ("table", "pairwise", "figure"):
            run.log_artifact(outputs[key])
        log_to_parent(outputs["table"], f"models/{dataset}/{task}")
    return summary
