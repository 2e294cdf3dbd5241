"""The common frame of every rule's script: log file, MLflow child run, one-line errors.

A script is then three lines: import, define ``body(smk, run)``, call :func:`run_stage`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from cellatlas.errors import CellAtlasError


def _setup_logging(log_path: str):
    terminal = sys.stderr
    stream = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, stream=stream, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    return terminal, stream


def _to_builtin(value: Any) -> Any:
    """Snakemake's Namedlist params -> plain dicts/lists for logging."""
    if isinstance(value, dict):
        return {k: _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value


def params_of(smk) -> dict[str, Any]:
    return {k: _to_builtin(v) for k, v in smk.params.items()}


def run_stage(smk, stage: str, body: Callable[[Any, Any], None], *, part: str | None = None,
              name: str | None = None) -> None:
    """Run ``body(smk, run)`` inside the stage's MLflow child run.

    A :class:`CellAtlasError` becomes one line on the terminal (and in the log) and exit
    status 1, after which Snakemake removes the job's outputs; anything else keeps its
    traceback in the log. Either way the MLflow run is closed as failed.
    """
    terminal, stream = _setup_logging(smk.log[0])
    from cellatlas._numba import enable_cache

    enable_cache(os.path.join(os.getcwd(), ".snakemake", "numba-cache"))
    from cellatlas.tracking import stage_run

    wildcards = dict(smk.wildcards.items())
    dataset = wildcards.pop("dataset", None)
    # further wildcards (task, model) name the run and tag it: classify:sim/label/knn
    parts = [dataset or "", *wildcards.values(), *([part] if part else [])]
    name = name or (f"{stage}:" + "/".join(parts).strip("/") if dataset else stage)
    # "cellatlas.kind" already says pipeline or stage; the classify/regress wildcard gets its own name
    tags = {f"cellatlas.{'task_dir' if k == 'kind' else k}": str(v) for k, v in wildcards.items()}
    logging.getLogger("cellatlas").info("stage %s, dataset %s, %s, threads %s", stage, dataset, wildcards, smk.threads)
    try:
        with stage_run(stage, dataset, params=params_of(smk), record=smk.output.run, name=name, tags=tags) as run:
            body(smk, run)
    except CellAtlasError as e:
        msg = f"cellatlas error in stage {stage}: {e}"
        print(msg, file=stream)
        print(msg, file=terminal)
        sys.exit(1)
