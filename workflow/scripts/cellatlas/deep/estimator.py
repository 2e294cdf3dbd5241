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

#: the image networks (cellatlas.deep.vision) and what transfer learning may freeze
ARCHITECTURES = ("small_cnn", "resnet18")
FREEZE = ("none", "all_but_last")
#: augmentation settings (cellatlas.deep.vision.augment) and their values when not given
AUGMENTATION = {"flips": True, "rotate90": True, "brightness": 0.1, "contrast": 0.1, "crop_scale": 1.0}
#: pixel values per forward pass at prediction (about 256 MiB of float32 input)
PREDICT_VALUES = 2**26


class _LightningClassifier(ClassifierMixin, BaseEstimator):
    """What the Lightning-trained classifiers share: trainer settings from ``trainer`` and the
    model's epochs, class codes and weights, the fit, probabilities from ``_logits``, and pickling
    without the job's tracking run."""

    def settings(self):
        from cellatlas.deep.training import TrainerSettings

        s = TrainerSettings.from_mapping(self.trainer)
        s.max_epochs, s.patience = self.max_epochs, self.patience
        s.threads = s.threads or self.n_jobs
        return s

    def _encode(self, y) -> tuple[np.ndarray, list[float] | None]:
        """Class codes of ``y`` (``classes_`` set) and, with ``class_weight="balanced"``, each
        class's loss weight, inversely to its size."""
        self.classes_, codes = np.unique(np.asarray(y).astype(str), return_inverse=True)
        if self.class_weight != "balanced":
            return codes, None
        counts = np.bincount(codes, minlength=len(self.classes_))
        return codes, (len(codes) / (len(self.classes_) * np.maximum(counts, 1))).tolist()

    def _train(self, plan, X, codes, *, groups, log_prefix: str, checkpoint: str | None):
        """Fit ``plan`` on ``X`` and keep its best network on the CPU, its history and summary."""
        from cellatlas.deep.data import CellDataModule
        from cellatlas.deep.training import fit

        settings = self.settings()
        data = CellDataModule(X, y=codes, groups=None if groups is None else np.asarray(groups),
                              val_fraction=self.val_fraction, batch_size=self.batch_size, seed=self.random_state,
                              on_device=settings.data_on_device)
        result = fit(plan, data, settings, tracking=self.tracking, prefix=log_prefix, checkpoint=checkpoint)
        self.net_ = result.plan.net.cpu().eval()
        self.history_ = result.history
        self.fit_summary_ = result.summary()
        self.fit_summary_.update(device=result.device, precision=result.precision, validation_split=result.split)
        return self

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


class MLPClassifier(_LightningClassifier):
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


    def fit(self, X, y, *, groups: np.ndarray | None = None, log_prefix: str = "curve", checkpoint: str | None = None):
        """Train on ``X, y``; ``groups`` (donors) shape the validation split, ``log_prefix`` the
        MLflow metric names, ``checkpoint`` receives the best epoch's Lightning checkpoint."""
        from cellatlas.deep.plans import ClassifierPlan
        from cellatlas.deep.training import seed

        self._validate_params()
        codes, weights = self._encode(y)
        self.n_features_in_ = X.shape[1]
        seed(self.random_state)
        plan = ClassifierPlan(
            n_genes=X.shape[1], n_classes=len(self.classes_), hidden=tuple(self.hidden), dropout=self.dropout,
            input_clip=self.input_clip, lr=self.lr, weight_decay=self.weight_decay, class_weights=weights,
            label_smoothing=self.label_smoothing,
        )
        return self._train(plan, X, codes, groups=groups, log_prefix=log_prefix, checkpoint=checkpoint)

    def _logits(self, X) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], PREDICT_CHUNK):
                chunk = X[start:start + PREDICT_CHUNK]
                chunk = chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)
                out.append(self.net_(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))).numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)), dtype=np.float32)


class CNNClassifier(_LightningClassifier):
    """A Lightning-trained convolutional classifier of images (rows: flattened images); torch is
    imported only when it trains or predicts (the config check builds it).

    Parameters as the config names them: ``architecture`` (small_cnn, resnet18), ``image_shape``
    (channels, height, width; the stage sets it from the dataset), ``augmentation`` (see
    :func:`augment`), ``class_weight`` (balanced: the loss weighs classes inversely to their
    size), ``init_weights``/``freeze`` (transfer learning), and the training settings the MLP has.
    """

    _parameter_constraints = {
        "architecture": [StrOptions(set(ARCHITECTURES))],
        "image_shape": [list, tuple, None],
        "augmentation": [dict, None],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "val_fraction": [Interval(Real, 0, 0.5, closed="both")],
        "class_weight": [StrOptions({"balanced"}), None],
        "init_weights": [str, None],
        "freeze": [StrOptions(set(FREEZE))],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "n_jobs": [Interval(Integral, 1, None, closed="left"), None],
        "trainer": [dict, None],
        "tracking": [dict, None],
    }

    def __init__(self, architecture: str = "small_cnn", image_shape: Sequence[int] | None = None,
                 augmentation: Mapping[str, Any] | None = None, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 0.0, batch_size: int = 64, max_epochs: int = 20, patience: int = 4,
                 val_fraction: float = 0.1, class_weight: str | None = "balanced", init_weights: str | None = None,
                 freeze: str = "none", random_state: int = 0, n_jobs: int | None = None,
                 trainer: Mapping[str, Any] | None = None, tracking: Mapping[str, str] | None = None):
        self.architecture = architecture
        self.image_shape = image_shape
        self.augmentation = augmentation
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.init_weights = init_weights
        self.freeze = freeze
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.trainer = trainer
        self.tracking = tracking


    def _validate_params(self):
        super()._validate_params()
        from cellatlas.errors import CellAtlasError

        if unknown := sorted(set(self.augmentation or {}) - set(AUGMENTATION)):
            raise CellAtlasError(f"unknown augmentation {unknown} (settings: {sorted(AUGMENTATION)})")
        if self.freeze != "none" and not self.init_weights:
            raise CellAtlasError(f"freeze '{self.freeze}' without init_weights would train a head on random features")

    def fit(self, X, y, *, groups: np.ndarray | None = None, log_prefix: str = "curve", checkpoint: str | None = None):
        """Train on images ``X`` (flattened rows), labels ``y``; as :meth:`MLPClassifier.fit`."""
        from cellatlas.deep.training import seed
        from cellatlas.deep.vision import ImagePlan, load_weights
        from cellatlas.errors import CellAtlasError

        self._validate_params()
        X = np.asarray(X, dtype=np.float32)
        if self.image_shape is None:
            raise CellAtlasError("the image model has no image_shape (an image dataset sets it)")
        shape = tuple(int(v) for v in self.image_shape)
        if X.shape[1] != int(np.prod(shape)):
            raise CellAtlasError(f"rows of {X.shape[1]} values are not images of shape {shape}")
        if min(shape[1:]) < 8:
            raise CellAtlasError(f"images of {shape[1]}x{shape[2]} pixels are too small for the networks (8 at least)")
        codes, weights = self._encode(y)
        self.n_features_in_ = X.shape[1]
        # per-channel normalization from the training rows only
        channels = X.reshape(X.shape[0], shape[0], -1)
        mean = channels.mean(axis=(0, 2), dtype=np.float64)
        sd = channels.std(axis=(0, 2), dtype=np.float64)
        sd[sd < 1e-6] = 1.0
        seed(self.random_state)
        plan = ImagePlan(shape, len(self.classes_), architecture=self.architecture, dropout=self.dropout, lr=self.lr,
                         weight_decay=self.weight_decay, class_weights=weights,
                         augmentation={**AUGMENTATION, **(self.augmentation or {})},
                         mean=mean.tolist(), sd=sd.tolist(), freeze=self.freeze)
        if self.init_weights:
            load_weights(plan.net, self.init_weights)
        if self.freeze == "all_but_last":
            plan.freeze_all_but_last()
        # the network's input normalization travels with it (the plan, which holds the Trainer, does not)
        self.shape_, self.mean_, self.sd_ = shape, mean.astype(np.float32), sd.astype(np.float32)
        return self._train(plan, X, codes, groups=groups, log_prefix=log_prefix, checkpoint=checkpoint)

    def _logits(self, X) -> np.ndarray:
        import torch

        X = np.asarray(X, dtype=np.float32)
        chunk = max(1, PREDICT_VALUES // max(int(np.prod(self.shape_)), 1))
        c = self.shape_[0]
        mean = torch.from_numpy(self.mean_).view(1, c, 1, 1)
        sd = torch.from_numpy(self.sd_).view(1, c, 1, 1)
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], chunk):
                x = torch.from_numpy(np.ascontiguousarray(X[start:start + chunk])).view(-1, *self.shape_)
                out.append(self.net_((x - mean) / sd).float().numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)), dtype=np.float32)


