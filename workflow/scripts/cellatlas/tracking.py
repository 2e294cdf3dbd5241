"""MLflow tracking: one child run per stage job, under its invocation's parent run.

The parent is created by the Snakefile's ``onstart`` hook (:mod:`cellatlas.invocation`) and its
id handed to every job through the environment (jobs are separate processes, locally and under
SLURM). Each job
opens its own child run with :func:`stage_run`, which never leaves a run RUNNING: an
exception or a termination signal marks it FAILED/KILLED with the traceback as an artifact,
then the error goes on. Results are files first; each child writes a JSON record with its run
id and metrics into a declared output, so every result is traceable to its run.

A tracking server that cannot be reached fails the job before it computes anything, within
about half a minute, with one line naming the server and the host (:func:`check_server`): a
result that is not in the tracker is never produced silently. A server lost in the middle of a
job fails it once MLflow's own retries (2, set by the Snakefile) are spent, in one line too
(:func:`lost_tracking`); runs that could not be closed are closed by :mod:`cellatlas.liveness`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cellatlas.errors import TrackingError
from cellatlas.naming import TAG_DATASET, TAG_KIND, TAG_MODEL_URI, TAG_NOTES, TAG_STAGE, TAG_STATUS

log = logging.getLogger(__name__)

ENV_PARENT = "CELLATLAS_PARENT_RUN_ID"
ENV_EXPERIMENT = "CELLATLAS_EXPERIMENT"
ENV_CONFIG_HASH = "CELLATLAS_CONFIG_HASH"
ENV_GIT_COMMIT = "CELLATLAS_GIT_COMMIT"
ENV_INVOCATION = "CELLATLAS_INVOCATION"
ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "cellatlas"

MAX_PARAM_LEN = 500
#: what MLflow refuses in a param name (it takes alphanumerics, _, -, ., space, : and /)
_PARAM_NAME_REFUSED = re.compile(r"[^A-Za-z0-9_\-. :/]")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists become their JSON text. A character MLflow
    refuses in a param name (a user's label such as ``CD14+ Monocyte`` as a key) becomes ``_``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{_PARAM_NAME_REFUSED.sub('_', str(k))}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:MAX_PARAM_LEN]
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit(path: str | Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'results' / 'mlflow.db'}"


#: the cheapest call of the tracking API itself (``/health`` answers even where the API refuses)
_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (its environment variables)."""
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _tls_context():
    """TLS as MLflow's client would verify it (its environment variables)."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def check_server(uri: str, *, attempts: int = 3, timeout: float = 8.0, pause: float = 2.0) -> None:
    """Raise :class:`TrackingError` unless the http(s) tracking server at ``uri`` answers its API.

    ``attempts`` tries of ``timeout`` seconds each: a restart or a slow network is waited out, a
    server that is down or not reachable from this node fails in under a minute. A refusal (an
    MLflow server started without ``--allowed-hosts`` for the name the jobs use answers 403) fails
    at once. Other stores (SQLite, files) need no server and pass.
    """
    check_scheme(uri)
    if not uri.startswith(("http://", "https://")):
        return
    import http.client
    import urllib.error
    import urllib.request

    problem, hint = "", "start it, or check that this node can reach it"
    request = urllib.request.Request(uri.rstrip("/") + _PROBE, headers=_auth_headers())
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=_tls_context()) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            body = " ".join(e.read(300).decode(errors="replace").split())  # the error stays one line
            problem = f"HTTP {e.code} {e.reason}" + (f" ({body})" if body else "")
            if e.code in (401, 403):
                hint = ("start the server with --allowed-hosts naming the host in tracking.uri"
                        if "Host header" in body else "check the server's credentials (MLFLOW_TRACKING_USERNAME)")
                break
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, unknown host, timeout, not HTTP
            problem = str(getattr(e, "reason", e)) or type(e).__name__
        if attempt + 1 < attempts:
            time.sleep(pause)
    raise TrackingError(
        f"MLflow tracking server {uri} (tracking.uri or MLFLOW_TRACKING_URI) cannot be used from host "
        f"{socket.gethostname()}: {problem}; {hint}"
    )


def check_scheme(uri: str) -> None:
    """Raise :class:`TrackingError` for a URI MLflow cannot track to, or one holding credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        known = set(_tracking_store_registry._registry)  # MLflow's own stores and installed plugins
    except (ImportError, AttributeError):
        known = {"", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks"}
    if scheme not in known:
        shown = ", ".join(sorted(k for k in known if k))
        raise TrackingError(f"tracking.uri (or MLFLOW_TRACKING_URI) '{uri}': MLflow cannot track to a "
                            f"'{scheme}' URI (schemes: {shown})")
    if parts.password or (parts.username and scheme in ("http", "https")):
        # the config and the run records would carry them; the client reads the environment
        raise TrackingError(f"tracking.uri (or MLFLOW_TRACKING_URI) for {parts.hostname}: holds credentials; "
                            "remove them and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")


#: what a lost store raises, in its cause chain (MLflow wraps them in MlflowException)
_LOST = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NewConnectionError",
         "RemoteDisconnected", "ProtocolError", "OperationalError", "ConnectionRefusedError")


def lost_tracking(uri: str, exc: BaseException, *, during: str) -> TrackingError | None:
    """The one-line error for ``exc`` if it means the tracking store was lost, else None.

    Judged by the exception chain (a refused connection, a timeout, retries spent, a database
    that went away) and, for a server, by asking it again: a server that answers now did not fail
    the job, so its own error keeps its traceback.
    """
    seen, e, chain = set(), exc, []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    lost = bool(names & set(_LOST)) or "API request to" in text or "Max retries exceeded" in text
    if not lost:
        return None
    if uri.startswith(("http://", "https://")):
        try:
            check_server(uri, attempts=1, timeout=5)
            return None
        except TrackingError:
            pass
    first = " ".join(str(chain[-1]).split())[:200]
    return TrackingError(f"lost the MLflow tracking store {uri} (tracking.uri or MLFLOW_TRACKING_URI) {during} on "
                         f"host {socket.gethostname()}: {first}; the run is closed by the next invocation, "
                         "rerun when the store is back")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database, not in ./mlruns of whatever the working directory is
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("mlflow-artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def common_tags() -> dict[str, str]:
    """Config hash, commit, invocation, and who runs it: host, pid, SLURM job (:mod:`cellatlas.liveness`)."""
    from cellatlas.liveness import identity

    tags = {
        "cellatlas.config_hash": os.environ.get(ENV_CONFIG_HASH, "unknown"),
        "cellatlas.git_commit": os.environ.get(ENV_GIT_COMMIT, "unknown"),
        **identity(),
    }
    if os.environ.get(ENV_INVOCATION):  # the parent's name: which invocation made this run
        tags["cellatlas.invocation"] = os.environ[ENV_INVOCATION]
    return tags


class StageRun:
    """Handle on a stage's child run: logs to MLflow and keeps what it logged for the record."""

    def __init__(self, client, run_id: str, uri: str | None = None, experiment_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.metrics: dict[str, float] = {}
        self.params: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.inputs: list[dict[str, str]] = []
        self.model_uri = ""
        self.model_sha256 = ""
        #: sha256 of model files the job wrote (by file name), checked by the jobs that load them
        self.files_sha256: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])
        self.params.update(flat)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric, finite entries (booleans and strings are kept as tags).

        Stepped metrics (per fold, per epoch) go to MLflow's history only; the run record keeps
        the unstepped summary values.
        """
        import math
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch, tags = [], []
        for k, v in metrics.items():
            if isinstance(v, bool) or isinstance(v, str):
                tags.append(RunTag(f"cellatlas.{k}", str(v)))
            elif isinstance(v, (int, float)) and math.isfinite(float(v)):
                batch.append(Metric(k, float(v), now, step or 0))
                if step is None:
                    self.metrics[k] = float(v)
        self.client.log_batch(self.run_id, metrics=batch, tags=tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
        self.artifacts.append(Path(path).name)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_dataset(self, name: str, path: str | Path, *, context: str = "input") -> None:
        """Log a file the stage read as an MLflow dataset input (name, digest, source)."""
        from mlflow.entities import DatasetInput, InputTag

        from cellatlas.datasets import as_mlflow_dataset

        dataset = as_mlflow_dataset(name, path)
        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])])
        self.inputs.append({"name": name, "digest": dataset.digest, "path": str(path)})

    def register_model(self, name: str, model_uri: str, *, alias: str) -> str:
        """A new version of registered model ``name`` for ``model_uri``, given ``alias``; returns the version.

        Versions are never deleted: the alias moves to the newest best, older bests stay loadable
        by version number.
        """
        import mlflow

        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        from cellatlas.modelstore import TAG_SHA256

        tags = {"cellatlas.run_id": self.run_id, TAG_SHA256: self.model_sha256}
        version = mlflow.register_model(model_uri, name, tags=tags).version
        self.client.set_registered_model_alias(name, alias, version)
        self.set_tag("cellatlas.registered_model", f"models:/{name}@{alias} (version {version})")
        return str(version)

    def set_file_digest(self, path: str | Path) -> None:
        """Record the sha256 of a model file the job wrote (tag ``cellatlas.sha256.<file name>``)."""
        from cellatlas.modelstore import FILE_TAG, digest

        self.files_sha256[Path(path).name] = value = digest(path)
        self.set_tag(FILE_TAG + Path(path).name, value)

    def log_model(self, model, *, name: str) -> str:
        """Log a :class:`cellatlas.stage.Model` as an MLflow model of this run; returns its URI.

        scikit-learn models are saved with skops, trusting exactly the types the model holds at
        save time (our transformers among them), so loading builds nothing else. A torch module
        (the MLP inside its estimator, the VAE) cannot be, and is cloudpickled; it returns a dict
        and takes optional batch codes, which MLflow 3's traced default cannot hold. Either way
        this package's code is attached (a model loads where the package is not installed) and
        the sha256 of the logged files is recorded in the run (:mod:`cellatlas.modelstore`, whose
        ``load_model`` checks it). Requirements are the installed pins (no slow inference).
        """
        from importlib.metadata import version

        import mlflow

        import cellatlas

        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        if self.experiment_id:
            # a logged model belongs to the active experiment: without this it lands in
            # "Default", whose artifacts go to ./mlruns of the working directory
            mlflow.set_experiment(experiment_id=self.experiment_id)
        code = [str(Path(cellatlas.__file__).parent)]
        if model.flavor == "torch":
            import mlflow.pytorch

            packages = ("torch", "lightning", "numpy", "cloudpickle", *model.requirements)
            kwargs = {"serialization_format": mlflow.pytorch.SERIALIZATION_FORMAT_PICKLE}
            flavor = mlflow.pytorch
        else:
            import mlflow.sklearn
            from mlflow.models import infer_signature

            from cellatlas.modelstore import skops_types

            example = model.input_example
            kwargs = {"input_example": example, "signature": infer_signature(example, model.obj.predict(example))}
            trusted = skops_types(model.obj)
            if trusted is None:
                kwargs["serialization_format"] = mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE
                packages = ("scikit-learn", "numpy", "scipy", "pandas", "cloudpickle", *model.requirements)
            else:
                kwargs.update(serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS, skops_trusted_types=trusted)
                packages = ("scikit-learn", "numpy", "scipy", "pandas", "skops", *model.requirements)
            flavor = mlflow.sklearn
        # a local build tag (torch's "+cpu") is not on the package index; the release is
        pins = [f"{p}=={version(p).split('+')[0]}" for p in dict.fromkeys(packages)]
        info = flavor.log_model(model.obj, name=name, run_id=self.run_id, pip_requirements=pins, code_paths=code,
                                **kwargs)
        self.model_uri = info.model_uri
        self.set_tag(TAG_MODEL_URI, info.model_uri)
        self._record_model_digest(info.model_uri)
        self.artifacts.append(name)
        return info.model_uri

    def _record_model_digest(self, model_uri: str) -> None:
        """The sha256 of the files as the store holds them, read back once they are logged."""
        import tempfile

        import mlflow

        from cellatlas.modelstore import TAG_SHA256, digest

        with tempfile.TemporaryDirectory(prefix="cellatlas-digest-") as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=self.uri)
            self.model_sha256 = digest(path)
        self.set_tag(TAG_SHA256, self.model_sha256)
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
        if model_id:
            self.client.set_logged_model_tags(model_id, {TAG_SHA256: self.model_sha256})


@contextmanager
def stage_run(
    stage: str,
    dataset: str | None,
    *,
    params: Mapping[str, Any],
    record: str | Path,
    workdir: str | Path = ".",
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """A child run of the invocation's parent for one stage job.

    On success the record JSON (run id, metrics, params) is written to ``record``; on any
    exception, or SIGTERM (how Snakemake and SLURM stop a job), the run ends FAILED or KILLED
    with ``error.txt`` attached, and the exception propagates.
    """
    uri = os.environ.get(ENV_URI) or default_uri(workdir)
    experiment = os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT)
    parent = os.environ.get(ENV_PARENT)
    check_server(uri)
    client = _client(uri)
    exp_id = _experiment_id(client, experiment, uri)
    run_tags = {**common_tags(), **(tags or {}), TAG_STAGE: stage, TAG_STATUS: "running", TAG_KIND: "stage"}
    if dataset:
        run_tags[TAG_DATASET] = dataset
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run_name = name or (f"{stage}:{dataset}" if dataset else stage)
    run = client.create_run(exp_id, run_name=run_name, tags=run_tags)
    handle = StageRun(client, run.info.run_id, uri, exp_id)

    def _terminate(signum, frame):  # turn SIGTERM into an exception so the run is closed
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    from cellatlas.liveness import watch_invocation

    watch_invocation(lambda why: client.set_tag(run.info.run_id, TAG_NOTES, why))
    try:
        handle.log_params(params)
        yield handle
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:
            client.set_tag(run.info.run_id, TAG_STATUS, status.lower())
            client.log_text(run.info.run_id, "".join(traceback.format_exception(exc)), "error.txt")
            client.set_terminated(run.info.run_id, status=status)
        except Exception as e:  # the store itself is gone: the job's own error is what the user must see
            log.error("could not close run %s as %s (%s); the next invocation marks it KILLED", run.info.run_id,
                      status, " ".join(str(e).split())[:300])
        raise
    else:
        client.set_tag(run.info.run_id, TAG_STATUS, "finished")
        client.set_terminated(run.info.run_id, status="FINISHED")
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "run_id": run.info.run_id,
            "experiment_id": exp_id,
            "parent_run_id": parent or "",
            "tracking_uri": uri,
            "stage": stage,
            "dataset": dataset or "",
            "metrics": handle.metrics,
            "params": handle.params,
            "artifacts": handle.artifacts,
            "inputs": handle.inputs,
            "model_uri": handle.model_uri,
            "model_sha256": handle.model_sha256,
            "files_sha256": handle.files_sha256,
            "run_name": run_name,
            "step": run_tags.get("cellatlas.step", ""),
            "config_hash": os.environ.get(ENV_CONFIG_HASH, "unknown"),
        }
        Path(record).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
