"""The Trainer as the pipeline runs it, and a fit that always starts fresh and returns the best model.

* ``accelerator="auto"``: the GPU of a GPU node, else the CPU; ``precision="auto"``: bf16-mixed
  on a GPU that has bf16, full 32-bit elsewhere.
* Early stopping on the validation loss; the best epoch's checkpoint is kept and restored.
* Never resumes: every fit writes its checkpoints into a fresh directory, so a rerun after a
  kill cannot pick up a stale checkpoint of other parameters.
* Live metrics: Lightning's MLflow logger writes into the stage's own run (explicit tracking
  URI; the run's lifecycle stays with the stage, so the logger never closes it).
* No progress bars (they garble non-interactive logs); the log gets one line per epoch.
* Data parallel on one node (``devices`` > 1): when nothing started one process per device (a
  local run, or a SLURM job whose step has one task, which is how Snakemake starts a job),
  Lightning starts them itself (``ddp_spawn``) and is told not to take SLURM's task count as the
  world size; otherwise it would train in one process and say nothing. The fit's history and
  best epoch then come back from the workers' checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
)

from cellatlas.deep.devices import requested_devices
from cellatlas.deep.plans import TRAIN_LOSS, VAL_LOSS, NonFiniteLossError
from cellatlas.errors import CellAtlasError

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """How a model is trained (the config's ``train.trainer`` block, plus the model's own epochs)."""

    max_epochs: int = 50
    patience: int = 5
    min_delta: float = 0.0
    max_time_minutes: float | None = None
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "auto"
    deterministic: bool = True
    data_on_device: bool | str = "auto"
    threads: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TrainerSettings:
        names = {f.name for f in fields(cls)}
        values = dict(values or {})
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown trainer settings {sorted(unknown)} (settings: {sorted(names)})")
        return cls(**values)


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


class StageRunLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to an existing run that the stage owns.

    Metric keys are ``<prefix>/<name>`` (MLflow's UI groups charts by the part before ``/``), the
    epoch their step;
    hyperparameters are logged by the stage, once, not by every fit.
    """

    LOGGER_JOIN_CHAR = "/"

    def __init__(self, *, tracking_uri: str, run_id: str, prefix: str = ""):
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, prefix=prefix)

    def log_metrics(self, metrics, step=None) -> None:
        # the epoch is the step (Lightning's own step counts batches), not a curve of its own
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, int(epoch) if epoch is not None else step)

    def log_hyperparams(self, params) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass  # the stage ends its run (FINISHED or FAILED); a fit ending must not

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        pass  # the best checkpoint is a declared output, logged once by the stage


def device_count(settings: TrainerSettings) -> int:
    """How many devices (processes) a fit asks for; "auto"/-1 is every GPU there is, else 1."""
    n = requested_devices(settings.devices)
    if n is not None:
        return n
    gpus = torch.cuda.device_count() if settings.accelerator in ("auto", "gpu", "cuda") else 0
    return max(gpus, 1)


def launch_plan(settings: TrainerSettings) -> tuple[str, list, int]:
    """(strategy, cluster-environment plugins, processes) for the Trainer.

    Inside a SLURM job Lightning trusts ``SLURM_NTASKS`` and expects srun to have started one
    process per device; a Snakemake job is a step of one task, so unless the step has one task
    per device Lightning is handed a plain environment and starts the processes itself.
    """
    n = device_count(settings)
    in_slurm = SLURMEnvironment.detect()
    # Snakemake resubmits a failed job itself: Lightning must not requeue it behind its back
    slurm = [SLURMEnvironment(auto_requeue=False)] if in_slurm else []
    if n <= 1:
        return settings.strategy, slurm, 1
    if in_slurm:
        # only srun starts processes: the tasks of this job step, not of the allocation, count
        step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
        if step_tasks == n:
            return settings.strategy, slurm, n  # srun started one process per device
        plugins = [LightningEnvironment()]
    else:
        plugins = []
    # spawn, not Lightning's default subprocess launcher, which would rerun the whole job script
    strategy = "ddp_spawn" if settings.strategy in ("auto", "ddp") else settings.strategy
    return strategy, plugins, n


class History(Callback):
    """Every epoch's logged metrics, kept in memory and written to the job's log.

    Its rows are part of each checkpoint, so that a fit run by spawned workers hands them back.
    """

    def __init__(self, label: str = ""):
        self.label = label
        self.rows: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        row = {"epoch": trainer.current_epoch, "seconds": time.perf_counter() - self._t0}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.rows.append(row)
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch",))
        if trainer.is_global_zero:
            log.info("%sepoch %d: %s", f"{self.label} " if self.label else "", row["epoch"], shown)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


@dataclass
class FitResult:
    plan: L.LightningModule
    history: list[dict[str, float]]
    best_epoch: int
    best_score: float | None
    epochs: int
    stopped_early: bool
    seconds: float
    precision: str
    device: str
    split: str
    processes: int = 1

    def summary(self) -> dict[str, float]:
        out = {"epochs": self.epochs, "best_epoch": self.best_epoch, "stopped_early": float(self.stopped_early),
               "train_seconds": self.seconds, "processes": self.processes}
        if self.best_score is not None:
            out[f"best_{VAL_LOSS}"] = self.best_score
        return out


def seed(value: int) -> None:
    """Seed Python, NumPy and torch; call it before a plan is built (its initial weights)."""
    L.seed_everything(value, workers=True, verbose=False)


# the last line of a worker's traceback when it raised one of the pipeline's own errors
_WORKER_ERROR = re.compile(r"^cellatlas(?:\.\w+)*\.(\w+): (.+)$", re.MULTILINE)


def worker_error(exc: BaseException) -> CellAtlasError | None:
    """The pipeline's own error that a spawned worker raised, or None.

    torch hands a worker's exception to the launching process only as the text of its
    traceback; without this a NaN loss in data-parallel training would reach the user as a
    page of multiprocessing traceback instead of its one line.
    """
    from torch.multiprocessing import ProcessRaisedException

    if not isinstance(exc, ProcessRaisedException):
        return None
    found = _WORKER_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    return NonFiniteLossError(message) if name == NonFiniteLossError.__name__ else CellAtlasError(message)


def make_logger(tracking: Mapping[str, str] | None, prefix: str) -> StageRunLogger | bool:
    if not tracking:
        return False
    return StageRunLogger(tracking_uri=tracking["uri"], run_id=tracking["run_id"], prefix=prefix)


def fit(plan: L.LightningModule, data: L.LightningDataModule, settings: TrainerSettings, *,
        tracking: Mapping[str, str] | None = None, prefix: str = "", checkpoint: str | Path | None = None) -> FitResult:
    """Train ``plan`` on ``data`` from scratch; restore and return its best epoch.

    The caller seeds (:func:`seed`) before building ``plan``; dropout and the batch order then
    follow from that seed (same seed, same numbers on the CPU).

    ``tracking`` (``{"uri", "run_id"}``) sends every epoch's metrics, as ``<prefix>/<metric>``,
    to that run while training runs. ``checkpoint``: where the best checkpoint is copied.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if hasattr(data, "split"):
        data.split()
    has_val = len(getattr(data, "val_rows", [1])) > 0
    monitor = VAL_LOSS if has_val else TRAIN_LOSS
    history = History(prefix)
    precision = resolve_precision(settings.precision, settings.accelerator)
    strategy, plugins, processes = launch_plan(settings)
    scratch = Path(tempfile.mkdtemp(prefix="cellatlas-ckpt-"))
    try:
        # last.ckpt carries the full history and the early-stopping state out of spawned workers
        ckpt = ModelCheckpoint(dirpath=scratch, filename="best", monitor=monitor, mode="min", save_top_k=1,
                               save_last=processes > 1, enable_version_counter=False)
        stop = EarlyStopping(monitor=monitor, mode="min", patience=settings.patience, min_delta=settings.min_delta,
                             check_finite=True)
        max_time = {"minutes": settings.max_time_minutes} if settings.max_time_minutes else None
        trainer = L.Trainer(
            accelerator=settings.accelerator, devices=settings.devices, strategy=strategy, plugins=plugins,
            precision=precision,
            max_epochs=settings.max_epochs, max_time=max_time, deterministic=settings.deterministic,
            callbacks=[history, stop, ckpt], logger=make_logger(tracking, prefix), enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=scratch,
        )
        t0 = time.perf_counter()
        try:
            trainer.fit(plan, datamodule=data)
        except Exception as e:
            error = worker_error(e)
            if error is None:
                raise
            raise error from None
        seconds = time.perf_counter() - t0
        epochs, stopped_early, score = trainer.current_epoch, stop.stopped_epoch > 0, ckpt.best_model_score
        last = scratch / "last.ckpt"
        if not history.rows and last.exists():  # the workers trained; this process only launched them
            state = torch.load(last, map_location="cpu", weights_only=False)  # this job's own workers wrote it just now
            history.load_state_dict(state["callbacks"][history.state_key])
            stop_state = state["callbacks"][stop.state_key]
            epochs, stopped_early = int(state["epoch"]) + 1, stop_state["stopped_epoch"] > 0
            score = state["callbacks"][ckpt.state_key]["best_model_score"]
        best = ckpt.best_model_path
        best_epoch = epochs - 1
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)
            plan.load_state_dict(state["state_dict"])
            best_epoch = int(state["epoch"])
            if checkpoint is not None and trainer.is_global_zero:
                shutil.copyfile(best, checkpoint)
        elif checkpoint is not None:
            trainer.save_checkpoint(checkpoint)  # writes on global rank 0 only
        # under data parallel the best path is rank 0's scratch directory: no one deletes it early
        trainer.strategy.barrier("cellatlas-fit-done")
        result = FitResult(
            plan=plan, history=history.rows, best_epoch=best_epoch, best_score=None if score is None else float(score),
            epochs=epochs, stopped_early=stopped_early, seconds=seconds, precision=precision,
            device=str(trainer.strategy.root_device), split=getattr(data, "split_kind", "") or "",
            processes=trainer.world_size,
        )
        log.info("%s: %d epochs on %s (%s) in %d process(es), best epoch %d, %s %.4g, %.1f s", prefix or "fit",
                 result.epochs, result.device, precision, result.processes, result.best_epoch, monitor,
                 result.best_score or float("nan"), seconds)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
