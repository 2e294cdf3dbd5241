"""Training plans: what one step computes and logs, with explicit hyperparameters.

Metric names are the constants below; per epoch the plans log ``train_loss`` and
``val_loss`` (and, for the classifier, accuracy and macro-F1 computed exactly as the classify
stage scores its folds).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
import numpy as np
import torch
from torch.nn import functional as F

from cellatlas.deep.modules import MLP, NBVAE
from cellatlas.errors import CellAtlasError

TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"


class NonFiniteLossError(CellAtlasError):
    """The loss became NaN or infinite: training stops, the run fails, nothing is written."""


def _check_finite(loss: torch.Tensor, plan: L.LightningModule, batch_idx: int, phase: str = "training") -> None:
    """Stop at the first non-finite loss, training or validation: a fold scored on NaN is no score."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{phase} loss became {loss.item()} at epoch {plan.current_epoch}, batch {batch_idx} "
            f"(learning rate {plan.hparams.lr:g}); lower 'lr' or check the input values")


def _covariate(c: torch.Tensor) -> torch.Tensor | None:
    return c if c.numel() else None


class _Plan(L.LightningModule):
    lr: float
    weight_decay: float

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ClassifierSteps(_Plan):
    """What a classifier's training plan does each step: cross-entropy (class weights, label
    smoothing), per epoch ``train_loss``/``train_accuracy`` and ``val_loss`` plus the classify
    stage's own scores as ``val_<metric>``. ``train_logits`` is where a plan augments its input."""

    class_weights: torch.Tensor | None

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def _loss(self, logits, y):
        return F.cross_entropy(logits.float(), y, weight=self.class_weights,
                               label_smoothing=self.hparams.get("label_smoothing", 0.0))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.train_logits(x)
        loss = self._loss(logits, y)
        _check_finite(loss, self, batch_idx)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(TRAIN_LOSS, loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_accuracy", acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        loss = self._loss(logits, y)
        _check_finite(loss, self, batch_idx, "validation")
        self.log(VAL_LOSS, loss, on_step=False, on_epoch=True, batch_size=len(y))
        self._val.append((y.detach().cpu(), logits.argmax(1).detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        from cellatlas.metrics import scores

        y = torch.cat([v[0] for v in self._val]).numpy()
        p = torch.cat([v[1] for v in self._val]).numpy()
        self._val.clear()
        for name, value in scores("classification", y, p).items():
            self.log(f"val_{name}", value)


class ClassifierPlan(ClassifierSteps):
    """Cross-entropy training of :class:`~cellatlas.deep.modules.MLP`."""

    def __init__(self, n_genes: int, n_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.2,
                 input_clip: float | None = 10.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(n_genes, n_classes, hidden=hidden, dropout=dropout, input_clip=input_clip)
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", w, persistent=False)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VAEPlan(_Plan):
    """ELBO training of :class:`~cellatlas.deep.modules.NBVAE`, the KL term warmed up linearly."""

    def __init__(self, n_genes: int, n_latent: int = 10, hidden: int = 128, n_layers: int = 1, n_batches: int = 0,
                 dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-6, kl_warmup_epochs: int = 10,
                 encoder_input: str = "log1p", kl_weight: float = 1.0, genes: Sequence[str] | None = None, batches: Sequence[str] | None = None,
                 n_classes: int = 0, classification_weight: float = 1.0):
        """``genes`` and ``batches`` (input gene names, batch categories in code order) travel
        in the checkpoint so a new dataset can be aligned to the model and encoded.

        ``n_classes`` > 0 makes it semi-supervised as scANVI is: a linear classifier reads the
        latent means, and its cross-entropy on the labelled cells (class code >= 0; -1 is
        unlabelled), times ``classification_weight``, joins the loss, so cells of one label are
        drawn together across batches."""
        super().__init__()
        self.save_hyperparameters()
        self.net = NBVAE(n_genes, n_latent=n_latent, hidden=hidden, n_layers=n_layers, n_batches=n_batches,
                         dropout=dropout, encoder_input=encoder_input)
        self.classifier = torch.nn.Linear(n_latent, n_classes) if n_classes else None

    @property
    def kl_weight(self) -> float:
        w, top = self.hparams.kl_warmup_epochs, self.hparams.kl_weight
        return top if w <= 0 else top * min(1.0, (self.current_epoch + 1) / w)

    def _step(self, batch, prefix: str, batch_idx: int):
        x, y, c = batch
        out = self.net(x, _covariate(c))
        rec, kl = out["reconstruction"].mean(), out["kl"].mean()
        # validation is scored at the final KL weight so that epochs compare (the warm-up only shapes training)
        loss = rec + (self.kl_weight if prefix == "train" else self.hparams.kl_weight) * kl
        if self.classifier is not None and y.numel():
            labelled = y >= 0
            if labelled.any():
                ce = F.cross_entropy(self.classifier(out["z"][labelled]).float(), y[labelled])
                loss = loss + self.hparams.classification_weight * ce
                self.log(f"{prefix}_classification", ce, on_step=False, on_epoch=True, batch_size=int(labelled.sum()))
        _check_finite(loss, self, batch_idx, "training" if prefix == "train" else "validation")
        n = x.shape[0]
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{prefix}_reconstruction", rec, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{prefix}_kl", kl, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", batch_idx)

    @torch.no_grad()
    def embed(self, batches) -> np.ndarray:
        """Posterior means of the cells of ``batches`` (in their order), on the plan's device."""
        self.eval()
        out = []
        for x, _, c in batches:
            mean, _ = self.net.encode(x.to(self.device), None if not c.numel() else c.to(self.device))
            out.append(mean.float().cpu())
        return torch.cat(out).numpy()
