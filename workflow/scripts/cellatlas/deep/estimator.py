"""The MLP as a scikit-learn classifier.

As a final pipeline step after the classify stage's gene selection and scaling it is
cross-validated on the task's folds, scored, compared, refitted and logged exactly like the
scikit-learn models; only its ``fit`` trains with Lightning. Fitted, it holds the network on
the CPU and pickles like any estimator (the MLflow model and ``model.joblib``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions

log = logging.getLogger(__name__)

#: cells per forward pass at prediction
PREDICT_CHUNK = 8192


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """A Lightning-trained MLP classifier (see :class:`~cellatlas.deep.plans.ClassifierPlan`).

    ``max_epochs``, ``patience``, ``batch_size`` and ``val_fraction`` shape training; the
    validation cells (whole donors when ``groups`` are given and there are enough) come out of
    the cells passed to ``fit``, i.e. out of the training part of a fold. ``trainer`` holds
    the run's execution settings (:class:`~cellatlas.deep.training.TrainerSettings`);
    ``tracking`` (``{"uri", "run_id"}``) the MLflow run the epochs are logged to.
    """

    _parameter_constraints = {
        "hidden": [list, tuple],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "input_clip": [Interval(Real, 0, None, closed="neither"), None],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "val_fraction": [Interval(Real, 0, 0.5, closed="both")],
        "class_weight": [StrOptions({"balanced"}), None],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "n_jobs": [Interval(Integral, 1, None, closed="left"), None],
        "trainer": [dict, None],
        "tracking": [dict, None],
    }

    def __init__(self, hidden: Sequence[int] = (256, 128), dropout: float = 0.2, input_clip: float | None = 10.0,
                 lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 128, max_epochs: int = 50,
                 patience: int = 5, val_fraction: float = 0.1, class_weight: str | None = None,
                 label_smoothing: float = 0.0, random_state: int = 0, n_jobs: int | None = None,
                 trainer: Mapping[str, Any] | None = None, tracking: Mapping[str, str] | None = None):
        self.hidden = hidden
        self.dropout = dropout
        self.input_clip = input_clip
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.trainer = trainer
        self.tracking = tracking

    def settings(self):
        from cellatlas.deep.training import TrainerSettings

        s = TrainerSettings.from_mapping(self.trainer)
        s.max_epochs, s.patience = self.max_epochs, self.patience
        s.threads = s.threads or self.n_jobs
        return s

    def fit(self, X, y, *, groups: np.ndarray | None = None, log_prefix: str = "curve", checkpoint: str | None = None):
        """Train on ``X, y``; ``groups`` (donors) shape the validation split, ``log_prefix`` the
        MLflow metric names, ``checkpoint`` receives the best epoch's Lightning checkpoint."""
        from cellatlas.deep.data import CellDataModule
        from cellatlas.deep.plans import ClassifierPlan
        from cellatlas.deep.training import fit, seed

        self._validate_params()
        self.classes_, codes = np.unique(np.asarray(y).astype(str), return_inverse=True)
        weights = None
        if self.class_weight == "balanced":
            counts = np.bincount(codes, minlength=len(self.classes_))
            weights = (len(codes) / (len(self.classes_) * np.maximum(counts, 1))).tolist()
        self.n_features_in_ = X.shape[1]
        seed(self.random_state)
        plan = ClassifierPlan(
            n_genes=X.shape[1], n_classes=len(self.classes_), hidden=tuple(self.hidden), dropout=self.dropout,
            input_clip=self.input_clip, lr=self.lr, weight_decay=self.weight_decay, class_weights=weights,
            label_smoothing=self.label_smoothing,
        )
        settings = self.settings()
        data = CellDataModule(X, y=codes, groups=None if groups is None else np.asarray(groups),
                              val_fraction=self.val_fraction, batch_size=self.batch_size, seed=self.random_state,
                              on_device=settings.data_on_device)
        result = fit(plan, data, settings, tracking=self.tracking, prefix=log_prefix,
                     checkpoint=checkpoint)
        self.net_ = result.plan.net.cpu().eval()
        self.history_ = result.history
        self.fit_summary_ = result.summary()
        self.fit_summary_.update(device=result.device, precision=result.precision, validation_split=result.split)
        return self

    def _logits(self, X) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], PREDICT_CHUNK):
                chunk = X[start:start + PREDICT_CHUNK]
                chunk = chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)
                out.append(self.net_(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))).numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)), dtype=np.float32)

    def predict_proba(self, X) -> np.ndarray:
        logits = self._logits(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self._logits(X).argmax(axis=1)]

    def __getstate__(self):
        # the tracking run is a property of one job, not of the fitted model
        state = dict(self.__dict__)
        state["tracking"] = None
        return state
