"""Every name the pipeline gives things in MLflow: runs, tags, metrics, models (one place).

The README's "Compare runs" section documents the same scheme.
"""

from __future__ import annotations

import re

#: tags of every run
TAG_KIND = "cellatlas.kind"          # pipeline (an invocation) or stage (a job)
TAG_STAGE = "cellatlas.stage"        # the results/ folder the job writes: ingest ... cluster, classify,
#                                      regress, train, atlas, summary
TAG_STEP = "cellatlas.step"          # what the job does inside its stage: split, model, compare, vae, ...
TAG_DATASET = "cellatlas.dataset"
TAG_STATUS = "cellatlas.status"
TAG_NOTES = "cellatlas.notes"        # warnings that change a result's meaning
TAG_MODEL_URI = "cellatlas.model_uri"
TAG_MODEL_SHA256 = "cellatlas.model_sha256"  # sha256 of the logged model's files (cellatlas.modelstore)
TAG_FILE_SHA256 = "cellatlas.sha256."        # + file name: sha256 of a model file the job wrote
TAG_PRUNED = "cellatlas.pruned"              # when cellatlas-prune deleted the run's artifacts
#: who runs a run (cellatlas.liveness): closed as KILLED once that process or job is gone
TAG_HOST = "cellatlas.host"
TAG_PID = "cellatlas.pid"
TAG_PID_START = "cellatlas.pid_start"        # the pid's start time: a reused pid is another process
TAG_SLURM = "cellatlas.slurm_job_id"

#: metric prefixes (MLflow's chart view groups metrics by the part before the first "/")
CV = "cv"          # cross-validated: mean over folds (cv/macro_f1), sample sd (cv/macro_f1_sd)
FOLD = "fold"      # per fold, the fold number as step (fold/macro_f1)
CURVE = "curve"    # training curves, the epoch as step (curve/train_loss, curve/val_loss)
FIT = "fit"        # facts of the final fit (fit/epochs, fit/best_epoch)
TIME = "time"      # seconds (time/final_fit_seconds)


BEST = "best"      # a task's comparison: best/cv/macro_f1, best/macro_f1_margin


def fit_metrics(summary: dict) -> dict:
    """A Lightning fit's summary in the scheme, for the MLP and the VAE alike: seconds under
    ``time/``, facts under ``fit/``, text (device, precision, validation split) as it is (a tag)."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, str):
            out[key] = value
        elif key.endswith("_seconds"):
            out[f"{TIME}/{key}"] = value
        else:
            out[f"{FIT}/{key}"] = value
    return out


def cv_mean(metric: str) -> str:
    return f"{CV}/{metric}"


def cv_sd(metric: str) -> str:
    return f"{CV}/{metric}_sd"


def best_cv(metric: str) -> str:
    return f"{BEST}/{cv_mean(metric)}"


def margin(metric: str) -> str:
    return f"{BEST}/{metric}_margin"


def fold(metric: str) -> str:
    return f"{FOLD}/{metric}"


def logged_model(*parts: str) -> str:
    """An MLflow logged model's name: ``<dataset>-<task>-<model>`` (``sim-cell_type-knn``)."""
    return "-".join(re.sub(r"[^A-Za-z0-9_]", "_", p) for p in parts if p)


def registered_model(dataset: str, task: str) -> str:
    """The Model Registry name of a task's best model; ``models:/<name>@best`` loads the current one."""
    return f"cellatlas.{dataset}.{task}"


#: the registry alias that follows the best model of a task
BEST_ALIAS = "best"


#: an integration method's scores: scIB's metrics grouped as the chart view shows them
INTEGRATION_BATCH = ("ilisi", "kbet", "graph_connectivity", "bras", "pcr")
INTEGRATION_BIO = ("clisi", "label_asw", "isolated_labels", "nmi", "ari")
INTEGRATION_GROUPS = {**{m: "batch" for m in INTEGRATION_BATCH}, **{m: "bio" for m in INTEGRATION_BIO}}
HELDOUT = "heldout"  # the same method fitted without one donor, which it then places


def integration_metric(column: str) -> str:
    """An integration table column as a stage-run metric: ``batch/ilisi``, ``bio/ari``, ``total``,
    ``heldout/total`` (the table's ``heldout_total``)."""
    if column.startswith(HELDOUT + "_"):
        return f"{HELDOUT}/{column[len(HELDOUT) + 1:]}"
    group = INTEGRATION_GROUPS.get(column)
    return f"{group}/{column}" if group else column


def headline(*parts: str) -> str:
    """A parent-run metric: ``<dataset>/<what>``, ``<dataset>/<task>/<what>``, ``atlas/<atlas>/<query>/<method>/<what>``."""
    return "/".join(parts)
