"""The README's tracking server (cellatlas-server), started for real on 127.0.0.1: no one without
credentials reads or writes, jobs authenticate from their environment, a model changed in the
artifact store after logging is refused."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from workflow_utils import child_commands

from cellatlas import tracking

pytestmark = pytest.mark.server
PASSWORD = "admin-s3cret-for-the-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, *, method: str = "GET", data: bytes | None = None, auth: tuple[str, str] | None = None) -> int:
    import base64

    request = urllib.request.Request(url, method=method, data=data)
    if data is not None and "/api/2.0/mlflow/" in url:
        request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:
        return 0  # nothing listens (yet)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server") / "mlflow-server"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CELLATLAS_"))}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = PASSWORD
    log = (folder.parent / "server.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cellatlas-server"), "--dir", str(folder),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=folder.parent)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _status(uri + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("admin", PASSWORD)) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("cellatlas-server did not start:\n" + (folder.parent / "server.log").read_text()[-3000:])
        time.sleep(1)
    yield {"uri": uri, "port": port, "pid": proc.pid, "folder": folder}
    os.killpg(proc.pid, 15)
    proc.wait(30)


@pytest.fixture
def as_user(server, monkeypatch):
    """The environment a job gets: the server's URI and the user's credentials."""
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "CELLATLAS_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, "secured")
    return server


def test_the_server_listens_on_this_host_only(server):
    import psutil

    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == server["port"]]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}


def test_without_credentials_nothing_is_read_or_written(server):
    api = server["uri"] + "/api/2.0/mlflow"
    assert _status(api + "/experiments/search?max_results=1") == 401
    assert _status(api + "/experiments/create", method="POST", data=b'{"name": "x"}') == 401
    # the attack of the issue: an artifact PUT over a logged model's file
    put = server["uri"] + "/api/2.0/mlflow-artifacts/artifacts/1/models/m-0/artifacts/model.pkl"
    assert _status(put, method="PUT", data=b"planted") == 401
    assert _status(api + "/experiments/search?max_results=1", auth=("admin", "wrong")) == 401
    # the secrets the server made are the user's alone
    for name in ("auth.ini", "flask-secret"):
        assert (server["folder"] / name).stat().st_mode & 0o077 == 0


def test_a_job_without_credentials_stops_with_one_line(server, monkeypatch):
    from cellatlas.errors import TrackingError

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TrackingError) as err:
        tracking.check_server(server["uri"])
    assert "HTTP 401" in str(err.value) and "MLFLOW_TRACKING_USERNAME" in str(err.value) and "\n" not in str(err.value)


def test_credentials_in_the_uri_are_refused():
    from cellatlas.errors import TrackingError

    with pytest.raises(TrackingError, match="holds credentials.*MLFLOW_TRACKING_PASSWORD"):
        tracking.check_server("http://alice:pw@login01:5000")


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):
    """A scikit-learn model logged by a stage run through the server, as the classify stage does."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from cellatlas.stage import Model

    env = {"MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": PASSWORD, tracking.ENV_EXPERIMENT: "secured"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        X = np.random.default_rng(0).normal(size=(40, 3))
        y = (X[:, 0] > 0).astype(int)
        record = tmp_path_factory.mktemp("rec") / "run.json"
        with tracking.stage_run("classify", "d", params={}, record=record) as run:
            uri = run.log_model(Model(LogisticRegression().fit(X, y), flavor="sklearn", input_example=X[:2]),
                                name="d-label-logreg")
        yield {"uri": uri, "run_id": run.run_id, "X": X, "record": record, "sha": run.model_sha256}
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_the_model_is_logged_without_pickle_with_its_digest_and_no_password_anywhere(as_user, logged):
    from mlflow.tracking import MlflowClient

    import json

    rec = json.loads(logged["record"].read_text())
    run = MlflowClient().get_run(logged["run_id"])
    assert len(logged["sha"]) == 64 and run.data.tags["cellatlas.model_sha256"] == logged["sha"] == rec["model_sha256"]
    # skops: scikit-learn's format that builds only the recorded types, no pickle
    stored = list((as_user["folder"] / "artifacts").rglob("model.skops"))
    assert stored and not list((as_user["folder"] / "artifacts").rglob("model.pkl"))
    assert PASSWORD not in logged["record"].read_text() and PASSWORD not in json.dumps(run.data.to_dictionary())


def test_a_model_changed_after_logging_is_refused_with_one_line(as_user, logged):
    from cellatlas.modelstore import ModelIntegrityError, load_model

    model = load_model(logged["uri"])
    assert list(model.predict(logged["X"][:5])) == list((logged["X"][:5, 0] > 0).astype(int))
    (stored,) = (as_user["folder"] / "artifacts").rglob("model.skops")
    relative = stored.relative_to(as_user["folder"] / "artifacts").as_posix()
    put = f"{as_user['uri']}/api/2.0/mlflow-artifacts/artifacts/{relative}"
    assert _status(put, method="PUT", data=b"planted") == 401  # a stranger cannot
    assert load_model(logged["uri"]) is not None
    # someone who can write the store (its admin, a shared filesystem) replaces the file
    assert _status(put, method="PUT", data=b"planted", auth=("admin", PASSWORD)) == 200
    with pytest.raises(ModelIntegrityError) as err:
        load_model(logged["uri"])
    message = str(err.value)
    assert "\n" not in message and logged["uri"] in message and "changed after logging" in message


def test_a_second_user_reads_what_the_first_made_but_cannot_change_it(as_user, logged, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cellatlas.server import main

    monkeypatch.setenv("CELLATLAS_NEW_PASSWORD", "bobs-password")
    main(["add-user", "bob", "--tracking-uri", as_user["uri"]])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bobs-password")
    assert MlflowClient().get_run(logged["run_id"]).info.status == "FINISHED"
    api = as_user["uri"] + "/api/2.0/mlflow/runs/set-tag"
    body = ('{"run_id": "%s", "key": "x", "value": "y"}' % logged["run_id"]).encode()
    assert _status(api, method="POST", data=body, auth=("bob", "bobs-password")) == 403
    assert _status(api, method="POST", data=body, auth=("admin", PASSWORD)) == 200


def test_the_readme_recipe_names_this_server():
    readme = (ROOT / "README.md").read_text()
    assert "cellatlas-server --dir" in readme and "mlflow server --host 0.0.0.0" not in readme
    assert shutil.which("cellatlas-server", path=str(Path(sys.executable).parent))


def test_a_server_opened_to_the_network_accepts_this_hosts_names_only_unless_told():
    import argparse

    from cellatlas.server import server_command

    args = argparse.Namespace(dir="srv", host="0.0.0.0", port=5000, backend_store_uri=None,
                              artifacts_destination=None, allowed_hosts=None, workers=2)
    cmd = server_command(args)
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert f"{socket.gethostname()}:5000" in allowed and "localhost:5000" in allowed
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    args.allowed_hosts = "login01:5000"
    cmd = server_command(args)
    assert cmd[cmd.index("--allowed-hosts") + 1] == "login01:5000"
    args.host, args.allowed_hosts = "127.0.0.1", None
    assert "--allowed-hosts" not in server_command(args)


def test_the_server_runs_no_job_workers(server):
    """MLflow's GenAI job runner (huey consumers) stays off: seven processes importing MLflow
    slowed a 2-core host's first requests from 0.4 s to 3-5 s and starved a test's first check."""
    commands = child_commands(server["pid"])
    assert commands, "the server's web processes should be there"
    assert not [c for c in commands if "huey" in c]


def test_a_users_job_runner_setting_is_kept(tmp_path, monkeypatch):
    from cellatlas.server import prepare

    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert prepare(tmp_path / "a")[1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert prepare(tmp_path / "b")[1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
