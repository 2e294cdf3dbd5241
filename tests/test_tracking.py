import json
import os

import pytest
from mlflow.tracking import MlflowClient

from cellatlas import invocation, tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in (tracking.ENV_PARENT, tracking.ENV_URI, tracking.ENV_EXPERIMENT):
        monkeypatch.delenv(var, raising=False)
    parent = invocation.start_parent(uri=uri, experiment="t", config={"a": {"b": [1, 2]}}, workdir=tmp_path)
    # start_parent exported these into os.environ for the jobs; let monkeypatch undo them
    for var in (tracking.ENV_PARENT, tracking.ENV_URI, tracking.ENV_EXPERIMENT, tracking.ENV_CONFIG_HASH, tracking.ENV_GIT_COMMIT,
                tracking.ENV_INVOCATION):
        monkeypatch.setenv(var, os.environ[var])
    return uri, parent, MlflowClient(uri)


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    # a user's label as a key: MLflow refuses '+' in a param name
    assert tracking.flatten({"map": {"CD14+ Monocyte": ["CD14+ Mono"], "CD4+/CD25 T Reg": []}}) == {
        "map.CD14_ Monocyte": '["CD14+ Mono"]', "map.CD4_/CD25 T Reg": "[]"}


def test_child_run_finished_with_record(store, tmp_path):
    uri, parent, client = store
    record = tmp_path / "rec" / "run.json"
    with tracking.stage_run("qc", "d1", params={"qc": {"mode": "mad"}}, record=record) as run:
        run.log_metrics({"cells_kept": 10, "ok": True, "nan": float("nan")})
    rec = json.loads(record.read_text())
    r = client.get_run(rec["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.tags["mlflow.parentRunId"] == parent
    assert r.data.tags["cellatlas.stage"] == "qc" and r.data.tags["cellatlas.dataset"] == "d1"
    assert r.data.tags["cellatlas.config_hash"] == tracking.config_hash({"a": {"b": [1, 2]}})
    assert r.data.params == {"qc.mode": "mad"} and r.data.metrics == {"cells_kept": 10.0}
    assert rec["metrics"] == {"cells_kept": 10.0} and rec["parent_run_id"] == parent
    invocation.end_parent("FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"


def test_failure_marks_run_failed_and_writes_no_record(store, tmp_path):
    uri, parent, client = store
    record = tmp_path / "run.json"
    with pytest.raises(RuntimeError):
        with tracking.stage_run("embed", "d1", params={}, record=record):
            raise RuntimeError("boom")
    assert not record.exists()
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id], "tags.`cellatlas.stage` = 'embed'")
    assert run.info.status == "FAILED" and run.data.tags["cellatlas.status"] == "failed"
    local = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    assert "RuntimeError: boom" in open(local).read()


def test_sigterm_marks_run_killed(store, tmp_path):
    import signal

    uri, parent, client = store
    with pytest.raises(SystemExit):
        with tracking.stage_run("cluster", "d1", params={}, record=tmp_path / "r.json"):
            os.kill(os.getpid(), signal.SIGTERM)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id], "tags.`cellatlas.stage` = 'cluster'")
    assert run.info.status == "KILLED"


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_the_job_fast_with_one_line_and_no_record(tmp_path, monkeypatch):
    import time

    from cellatlas.errors import TrackingError

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(tracking.ENV_URI, uri)
    record = tmp_path / "run.json"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        with tracking.stage_run("qc", "d1", params={}, record=record):
            raise AssertionError("the stage must not start")
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert uri in message and "tracking.uri" in message and "\n" not in message
    assert not record.exists()


def test_server_check_passes_a_live_server_refuses_a_refusing_one_and_ignores_local_stores(tmp_path):
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            # MLflow 3 answers /health for any Host header, but its API only for allowed hosts
            if not self.path.startswith("/api/2.0/mlflow/experiments/search"):
                self.send_response(404)
            elif self.headers["Host"].startswith("127.0.0.1"):
                self.send_response(200)
            else:
                self.send_response(403)
                self.end_headers()
                self.wfile.write(b"Invalid Host header - possible DNS rebinding attack detected")
                return
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_port}")
        # the same server under a name it does not allow: refused at once, with the remedy
        from cellatlas.errors import TrackingError

        with pytest.raises(TrackingError, match="--allowed-hosts"):
            tracking.check_server(f"http://localhost:{server.server_port}", pause=30)
    finally:
        server.shutdown()
    tracking.check_server(f"sqlite:///{tmp_path / 'x.db'}")  # no server to ask


@pytest.mark.workflow
def test_a_workflow_with_an_unreachable_server_starts_no_job(tmp_path):
    import yaml
    from conftest import ROOT
    from workflow_utils import make_workdir, snakemake

    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["tracking"]["uri"] = f"http://127.0.0.1:{_closed_port()}"
    w = make_workdir(tmp_path / "wf", config)
    r = snakemake(w, "--cores", "1")
    assert r.returncode != 0
    assert "cannot be used from host" in r.stderr and config["tracking"]["uri"] in r.stderr
    assert not list((w / "results").glob("*/ingest.h5ad"))
