"""The model kinds a config may name: estimator, task, defaults, sparse support, importance.

Hyperparameters in the config are the estimator's own keyword arguments (scikit-learn names),
laid over the defaults here; :func:`check_params` turns a wrong name into a one-line error
before any job runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cellatlas import keys


@dataclass(frozen=True)
class ModelKind:
    name: str
    task: str
    factory: Callable[..., Any]
    #: scikit-learn defaults we change (why: next to each entry)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: accepts a sparse matrix (otherwise selected genes are densified, never all genes)
    sparse: bool = True
    #: how informative genes are read off the fitted model: coef, impurity or permutation
    importance: str = "permutation"
    #: constructor arguments that take the job's threads and the seed
    n_jobs_arg: str | None = None
    seed_arg: str | None = None
    #: trained with Lightning (cellatlas.deep): its jobs may go to a GPU node
    deep: bool = False
    #: reads images (rows: flattened images of an image dataset), not genes
    images: bool = False


def _logreg(**kw):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**kw)


def _linear_svm(*, method: str = "sigmoid", cv: int = 3, **kw):
    # LinearSVC has no probabilities; per-cell class probabilities come from Platt scaling,
    # fitted by an inner CV inside the training part of each fold
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    return CalibratedClassifierCV(LinearSVC(**kw), method=method, cv=cv)


def _mlp(**kw):
    from cellatlas.deep.estimator import MLPClassifier

    return MLPClassifier(**kw)


def _cnn(**kw):
    from cellatlas.deep.estimator import CNNClassifier

    return CNNClassifier(**kw)


def _sk(module: str, cls: str):
    def make(**kw):
        import importlib

        return getattr(importlib.import_module(module), cls)(**kw)

    return make


KINDS: dict[str, ModelKind] = {
    m.name + ":" + m.task: m
    for m in (
        ModelKind("logistic_regression", keys.CLASSIFICATION, _logreg, {"C": 0.1, "max_iter": 2000}, importance="coef",
                  seed_arg="random_state"),
        ModelKind("linear_svm", keys.CLASSIFICATION, _linear_svm, {"C": 0.01, "max_iter": 5000}, importance="coef",
                  seed_arg="random_state"),
        ModelKind("random_forest", keys.CLASSIFICATION, _sk("sklearn.ensemble", "RandomForestClassifier"),
                  {"n_estimators": 200, "min_samples_leaf": 2}, importance="impurity", n_jobs_arg="n_jobs",
                  seed_arg="random_state"),
        # early stopping holds out 10% of the *training* fold: no test cell is seen
        ModelKind("hist_gradient_boosting", keys.CLASSIFICATION, _sk("sklearn.ensemble", "HistGradientBoostingClassifier"),
                  {"max_iter": 200, "early_stopping": True}, sparse=False, seed_arg="random_state"),
        ModelKind("knn", keys.CLASSIFICATION, _sk("sklearn.neighbors", "KNeighborsClassifier"),
                  {"n_neighbors": 15}, n_jobs_arg="n_jobs"),
        # a Lightning-trained network (cellatlas.deep); its training settings come from train.trainer
        ModelKind("mlp", keys.CLASSIFICATION, _mlp, {}, n_jobs_arg="n_jobs", seed_arg="random_state", deep=True),
        # a convolutional network on an image dataset (cellatlas.deep.vision); no gene importance
        ModelKind("cnn", keys.CLASSIFICATION, _cnn, {}, sparse=False, importance="none", n_jobs_arg="n_jobs",
                  seed_arg="random_state", deep=True, images=True),
        # thousands of standardized genes for thousands of cells: a small alpha overfits (R² < 0 at 10)
        ModelKind("ridge", keys.REGRESSION, _sk("sklearn.linear_model", "Ridge"), {"alpha": 1000.0}, importance="coef"),
        ModelKind("lasso", keys.REGRESSION, _sk("sklearn.linear_model", "Lasso"), {"alpha": 0.01, "max_iter": 2000, "tol": 1e-3},
                  importance="coef", seed_arg="random_state"),
        ModelKind("random_forest", keys.REGRESSION, _sk("sklearn.ensemble", "RandomForestRegressor"),
                  {"n_estimators": 100, "min_samples_leaf": 5, "max_features": 0.1}, importance="impurity",
                  n_jobs_arg="n_jobs", seed_arg="random_state"),
        ModelKind("hist_gradient_boosting", keys.REGRESSION, _sk("sklearn.ensemble", "HistGradientBoostingRegressor"),
                  {"max_iter": 200, "early_stopping": True}, sparse=False, seed_arg="random_state"),
        ModelKind("knn", keys.REGRESSION, _sk("sklearn.neighbors", "KNeighborsRegressor"), {"n_neighbors": 15},
                  n_jobs_arg="n_jobs"),
    )
}


def kinds_for(task: str) -> list[str]:
    return sorted(m.name for m in KINDS.values() if m.task == task)


def image_kinds() -> list[str]:
    return sorted(m.name for m in KINDS.values() if m.images)


def is_deep(kind: str, task: str) -> bool:
    return get_kind(kind, task).deep


def get_kind(kind: str, task: str) -> ModelKind:
    try:
        return KINDS[f"{kind}:{task}"]
    except KeyError:
        raise ValueError(f"model kind '{kind}' does not do {task} (kinds: {kinds_for(task)})") from None


def make_estimator(kind: str, task: str, params: Mapping[str, Any] | None = None, *, n_jobs: int = 1, seed: int = 0):
    """The estimator of ``kind`` with defaults, the config's ``params``, threads and seed."""
    m = get_kind(kind, task)
    kw = {**m.defaults, **(params or {})}
    if m.n_jobs_arg:
        kw.setdefault(m.n_jobs_arg, n_jobs)
    if m.seed_arg:
        kw.setdefault(m.seed_arg, seed)
    return m.factory(**kw)


def check_params(kind: str, task: str, params: Mapping[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the first parameter the estimator does not take."""
    est = make_estimator(kind, task, None)
    base = est.estimator if kind == "linear_svm" else est
    allowed = set(base.get_params(deep=False)) | ({"method", "cv"} if kind == "linear_svm" else set())
    for name in params or {}:
        if name not in allowed:
            raise ValueError(f"'{name}' is not a parameter of {kind} (parameters: {sorted(allowed)})")
    est = make_estimator(kind, task, params)
    base = est.estimator if kind == "linear_svm" else est
    # scikit-learn checks values only at fit; its own validator lets a bad value fail here, not in the job
    validate = getattr(base, "_validate_params", None)
    if validate is not None:
        validate()
