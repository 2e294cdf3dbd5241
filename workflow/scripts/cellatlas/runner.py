"""The one runner of every rule's script: log file, MLflow child run, outputs, one-line errors.

A script is then a few lines: import, define ``compute(smk, live)`` that calls the stage's
library entry and returns its :class:`~cellatlas.stage.Result`, call :func:`run_stage`. The
runner writes every entry of the result to the rule's output of the same name and logs it:
naming is decided here and in :mod:`cellatlas.naming`, nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellatlas.errors import CellAtlasError

log = logging.getLogger("cellatlas")

# OpenMP threads (torch's, scikit-learn's) that wait for work sleep instead of spinning. A job
# seldom has its cores to itself: Snakemake runs several jobs on them, and a waiting thread that
# spins holds a core another thread needs; beside two busy processes a VAE fit took 2x-17x as long
# (benchmarks/RESULTS.md). Alone, that fit is 3-10% slower. Each OpenMP runtime reads this once,
# when it loads: here, before a script imports any of them; a user's own value stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: third-party messages that say nothing about the user's results, silenced where they arise
_NOISE = (
    r".*Tip: For seamless cloud uploads.*",  # Lightning's advert, once per fit
    r".*litlogger.*",
    r".*`torch.cuda.amp.*",
    r".*LeafSpec.*is deprecated.*",  # torch's pytree API as Lightning 2.6 calls it, once per fit
    r".*does not have many workers.*",  # the data path batches in bulk; workers would only copy
)


def _silence_noise() -> None:
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage()
                                          and "Tip:" not in record.getMessage())
    # MLflow on every cloudpickled model; the README says once why models are pickled
    for name in ("mlflow.sklearn", "mlflow.pytorch"):
        logging.getLogger(name).addFilter(lambda record: "pickle" not in record.getMessage())


def _setup_logging(log_path: str):
    terminal = sys.stderr
    stream = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, stream=stream, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    _silence_noise()
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


@dataclass
class Live:
    """What a stage may use while it computes: the run its training curves stream into, and a
    scratch folder for files a library must write itself (moved into place by the runner)."""

    tracking: dict[str, str] | None
    workspace: Path


def write_result(result, outputs: dict[str, str]) -> None:
    """Write every entry of ``result`` to the output of the same name."""
    import joblib

    from cellatlas import h5ad_io

    for key, table in result.tables.items():
        table.to_csv(outputs[key], sep="\t", index=False)
    for key, record in result.records.items():
        Path(outputs[key]).write_text(json.dumps(record, indent=2) + "\n")
    for key, text in result.texts.items():
        Path(outputs[key]).write_text(text)
    for key, draw in result.figures.items():
        draw(outputs[key])
    for key, adata in result.data.items():
        if isinstance(adata, h5ad_io.Carried):
            h5ad_io.write(adata, outputs[key])
        else:
            adata.write_h5ad(outputs[key])
    for key, path in result.files.items():
        shutil.move(str(path), outputs[key])
    for key, model in result.models.items():
        if key in outputs:
            joblib.dump(model.obj, outputs[key])


def log_result(run, result, outputs: dict[str, str], *, model_name: str) -> None:
    """Log what the result holds to the stage's run, in the naming scheme of :mod:`cellatlas.naming`."""
    import numpy as np

    from cellatlas import naming

    if result.params:
        run.log_params(result.params)
    run.log_metrics(result.metrics)
    if result.cv:
        summary = {}
        for metric, values in result.cv.items():
            v = np.asarray(values, dtype=float)
            summary[naming.cv_mean(metric)] = float(np.mean(v))
            summary[naming.cv_sd(metric)] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        run.log_metrics(summary)
        for k in range(max(len(v) for v in result.cv.values())):
            run.log_metrics({naming.fold(m): v[k] for m, v in result.cv.items() if k < len(v)}, step=k)
    for item in result.inputs:
        run.log_dataset(item.name, item.path, context=item.context)
    logged = set(result.data) | set(result.models) | result.not_logged
    for key in outputs:
        if key != "run" and key not in logged:
            run.log_artifact(outputs[key])
    for key, model in result.models.items():
        run.log_model(model, name=model_name)
    for name, uri in result.register.items():
        run.register_model(name, uri, alias=naming.BEST_ALIAS)


def _job_name(smk, stage: str, part: str | None) -> tuple[str, dict[str, str], str | None]:
    """``<stage>:<wildcards in path order>[/<part>]`` (classify:sim/cell_type/knn), tags, dataset."""
    wildcards = {k: str(v) for k, v in smk.wildcards.items() if k != "kind"}  # classify/regress is the stage
    parts = [*wildcards.values(), *([part] if part else [])]
    name = f"{stage}:" + "/".join(parts) if parts else stage
    tags = {f"cellatlas.{k}": v for k, v in wildcards.items() if k != "dataset"}
    return name, tags, wildcards.get("dataset")


#: files that run code when loaded (pickle, Lightning checkpoints): digests recorded and checked
MODEL_FILES = (".joblib", ".ckpt")


def check_model_inputs(client, inputs: dict[str, str]) -> None:
    """Check each model file among ``inputs`` against the digest recorded by the run that wrote it
    (the ``run.json`` beside it names the run; the digest is read from the tracker, which the
    results folder cannot change)."""
    from cellatlas.modelstore import FILE_TAG, check_file

    for path in inputs.values():
        if not str(path).endswith(MODEL_FILES):
            continue
        record = Path(path).parent / "run.json"
        run_id = json.loads(record.read_text())["run_id"] if record.exists() else ""
        expected = client.get_run(run_id).data.tags.get(FILE_TAG + Path(path).name) if run_id else None
        check_file(path, expected, what="model file")


#: per-job scratch: the job's temporary files (a Lightning checkpoint, MLflow's staging) live here,
#: so a job killed outright leaves them where its next run, or the next invocation, clears them
SCRATCH = Path(".snakemake") / "cellatlas-scratch"


def scratch_folder(job: str) -> Path:
    """An empty scratch folder for ``job``, owned by this process."""
    from cellatlas.liveness import identity

    folder = (SCRATCH / re.sub(r"[^A-Za-z0-9_.-]+", "_", job)).resolve()
    shutil.rmtree(folder, ignore_errors=True)  # a killed earlier run of this job left it
    folder.mkdir(parents=True)
    (folder / "owner.json").write_text(json.dumps(identity()))
    return folder


def clear_scratch(root: Path = SCRATCH) -> int:
    """Remove the scratch folders of jobs whose process is gone; returns how many."""
    from cellatlas.liveness import GONE, TAG_HOST, TAG_PID, TAG_PID_START, process_state

    removed = 0
    for folder in root.glob("*") if root.is_dir() else ():
        try:
            owner = json.loads((folder / "owner.json").read_text())
            gone = process_state(owner[TAG_HOST], owner[TAG_PID], owner[TAG_PID_START]) == GONE
        except (OSError, ValueError, KeyError):
            gone = True  # no owner: a folder of an older version, or one cut off while it was made
        if gone:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _fail(message: str, stream, terminal) -> None:
    print(message, file=stream)
    print(message, file=terminal)
    sys.exit(1)


def run_stage(smk, stage: str, compute: Callable[[Any, Live], Any], *, step: str, part: str | None = None) -> None:
    """Run ``compute(smk, live)`` inside the stage's MLflow child run, then write and log its result.

    ``stage`` is the results/ folder the job writes (its tag), ``step`` what it does there.
    A :class:`CellAtlasError` becomes one line on the terminal (and in the log) and exit
    status 1, after which Snakemake removes the job's outputs; anything else keeps its
    traceback in the log. Either way the MLflow run is closed as failed.
    """
    terminal, stream = _setup_logging(smk.log[0])
    from cellatlas._numba import enable_cache

    enable_cache(os.path.join(os.getcwd(), ".snakemake", "numba-cache"))
    # scib-metrics' jax functions: compiled once per machine, not in every integrate job (~5 s each)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.getcwd(), ".snakemake", "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    from cellatlas import naming
    from cellatlas.stage import check_outputs
    from cellatlas.tracking import stage_run

    name, tags, dataset = _job_name(smk, stage, part)
    tags[naming.TAG_STEP] = step
    outputs = dict(smk.output.items())
    log.info("%s, threads %s", name, smk.threads)
    workspace = scratch_folder(name)
    # the job's temporary files (Lightning's, MLflow's staging) go there too
    previous_tmp = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(workspace)
    try:
        with stage_run(stage, dataset, params=params_of(smk), record=smk.output.run, name=name, tags=tags) as run:
            check_model_inputs(run.client, dict(smk.input.items()))
            live = Live({"uri": run.uri, "run_id": run.run_id} if run.uri else None, workspace)
            result = compute(smk, live)
            check_outputs(result, outputs, where=name)
            write_result(result, outputs)
            for path in outputs.values():
                if path.endswith(MODEL_FILES):
                    run.set_file_digest(path)
            log_result(run, result, outputs, model_name=naming.logged_model(*name.partition(":")[2].split("/")))
            for note in result.notes:  # the library logged it; the terminal must see it too
                print(f"cellatlas note ({name}): {note}", file=terminal)
            if result.notes:
                run.set_tag(naming.TAG_NOTES, " | ".join(result.notes))
    except CellAtlasError as e:
        _fail(f"cellatlas error in stage {stage}: {e}", stream, terminal)
    except Exception as e:
        from cellatlas.tracking import ENV_URI, default_uri, lost_tracking

        lost = lost_tracking(os.environ.get(ENV_URI) or default_uri("."), e, during=f"in job {name}")
        if lost is None:
            raise
        log.error("the tracking store failed", exc_info=e)  # the whole story stays in the job's log
        _fail(f"cellatlas error in stage {stage}: {lost}", stream, terminal)
    finally:
        tempfile.tempdir = previous_tmp[0]
        if previous_tmp[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_tmp[1]
        shutil.rmtree(workspace, ignore_errors=True)
