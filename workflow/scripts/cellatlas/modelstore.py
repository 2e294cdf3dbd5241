"""Models that are loaded only if they are the bytes that were logged.

Most model formats run code when they are loaded (pickle; a Lightning checkpoint's pickled
parts), so a model file replaced in the artifact store runs whatever was planted in the process
of whoever loads "the best model". Every model the pipeline logs gets the sha256 of its files
recorded in its run (tag :data:`TAG_SHA256`, in the tracking database, which the artifact store
cannot change), and :func:`load_model` downloads a model, checks its files against that digest and
only then loads it, from the checked copy. The pipeline's own loads of model files it wrote
(``model.joblib``, ``model.ckpt``) are checked the same way (:func:`check_file`).

Where a format that does not run code exists it is used: scikit-learn models are saved with
skops, which builds only the types recorded when the model was saved; models that hold a torch
module (the MLP, the VAE) stay pickled and rely on the digest alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cellatlas.datasets import file_digest
from cellatlas.errors import CellAtlasError
# the run tags holding a logged model's digest and, per file name, a written model file's
from cellatlas.naming import TAG_FILE_SHA256 as FILE_TAG
from cellatlas.naming import TAG_MODEL_SHA256 as TAG_SHA256


class ModelIntegrityError(CellAtlasError):
    """A model's files are not those recorded when it was logged (or nothing was recorded)."""


def digest(path: str | Path) -> str:
    """The full sha256 of a file, or of a folder's relative paths and bytes."""
    return file_digest(path, length=64)


def skops_types(model: Any) -> list[str] | None:
    """The types skops must build to load ``model``, or None if skops cannot save it (a torch module)."""
    try:
        import skops.io as sio

        return list(sio.get_untrusted_types(data=sio.dumps(model)))
    except Exception:  # noqa: BLE001 - any type skops cannot take means: pickle, with the digest
        return None


def _resolve(client, uri: str) -> tuple[str, str]:
    """(run id that logged the model, a URI to download it from) for models:/ and runs:/ URIs."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0], uri
    if not uri.startswith("models:/"):
        raise ModelIntegrityError(f"model '{uri}': give a models:/ or runs:/ URI")
    ref = uri[len("models:/"):]
    if ref.startswith("m-"):  # a logged model's id
        return client.get_logged_model(ref.split("/")[0]).source_run_id, uri
    name, _, rest = ref.partition("@") if "@" in ref else ref.partition("/")
    version = (client.get_model_version_by_alias(name, rest) if "@" in ref
               else client.get_model_version(name, rest))
    # the logged model itself: a registry download may add files of its own, which the digest never saw
    model_id = getattr(version, "model_id", None)
    return version.run_id, f"models:/{model_id}" if model_id else version.source


def load_model(uri: str, *, tracking_uri: str | None = None):
    """Load the model at ``uri`` (``models:/cellatlas.sim.label@best``) after checking its files
    against the digest its run recorded; :class:`ModelIntegrityError` (one line) otherwise."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id, source = _resolve(client, uri)
    expected = client.get_run(run_id).data.tags.get(TAG_SHA256)
    if not expected:
        raise ModelIntegrityError(f"model '{uri}': its run {run_id} recorded no digest ({TAG_SHA256}); "
                                  "it was not logged by this pipeline's checked path, load it with MLflow only if "
                                  "you trust every writer of the store")
    local = Path(tempfile.mkdtemp(prefix="cellatlas-model-"))
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(local),
                                                    tracking_uri=tracking_uri))
    found = digest(path)
    if found != expected:
        raise ModelIntegrityError(f"model '{uri}': its files do not match the sha256 its run {run_id} recorded "
                                  f"when it was logged ({expected[:12]}…, found {found[:12]}…); it was changed "
                                  "after logging: not loaded")
    return mlflow.pyfunc.load_model(str(path))  # the checked copy, never a second download


def check_file(path: str | Path, expected: str | None, *, what: str) -> None:
    """Raise :class:`ModelIntegrityError` unless ``path`` has the sha256 ``expected``."""
    if not expected:
        raise ModelIntegrityError(f"{what} '{path}': the run that wrote it recorded no digest; rerun that job "
                                  "(snakemake --forcerun <rule>) before loading it")
    found = digest(path)
    if found != expected:
        raise ModelIntegrityError(f"{what} '{path}': its bytes do not match the sha256 its run recorded "
                                  f"({expected[:12]}…, found {found[:12]}…); it was changed after it was written: "
                                  "not loaded")
