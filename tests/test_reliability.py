"""What happens when things go wrong: a job or Snakemake killed with SIGKILL, the tracking store
lost in the middle of a job or at the end of the invocation, a model file changed on disk. Each
case ends with one line naming the culprit, no partial output and no run left RUNNING."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cellatlas import invocation, liveness, tracking

# -- which runs are orphans -----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "CELLATLAS_"))]:
        monkeypatch.delenv(var)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # artifacts beside the store, as the pipeline puts them (not ./mlruns of the working directory)
    return uri, client, client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())


def _run(client, exp, tags):
    return client.create_run(exp, tags={"cellatlas.kind": "stage", **tags}, run_name="job").info.run_id


def test_runs_whose_process_is_gone_are_marked_killed_and_the_others_left(store):
    uri, client, exp = store
    me = liveness.identity()
    gone = _run(client, exp, {**me, liveness.TAG_PID: str(_dead_pid())})
    reused = _run(client, exp, {**me, liveness.TAG_PID_START: "12.00"})  # this pid, another process's start
    alive = _run(client, exp, me)
    elsewhere = _run(client, exp, {**me, liveness.TAG_HOST: "another-node"})
    found = liveness.reap(client, exp, by="the test")
    status = {r: client.get_run(r).info.status for r in (gone, reused, alive, elsewhere)}
    assert status == {gone: "KILLED", reused: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}
    assert len(found["killed"]) == 2 and found["unknown"] == ["job"]
    tags = client.get_run(gone).data.tags
    assert tags["cellatlas.status"] == "killed" and "marked KILLED by the test: process" in tags["cellatlas.notes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the boot-relative start is read from /proc")
def test_a_process_stays_alive_when_the_system_clock_moves(monkeypatch):
    """psutil's epoch start time is boot time + uptime, and the boot time follows the system clock:
    a clock stepped by a second (NTP, a virtual machine resumed) must not make a live process gone."""
    import psutil

    me = liveness.identity()
    assert liveness.process_state(me[liveness.TAG_HOST], me[liveness.TAG_PID], me[liveness.TAG_PID_START]) == "alive"
    epoch = psutil.Process(os.getpid()).create_time()
    stepped = psutil.boot_time() + 1.5
    monkeypatch.setattr(psutil, "boot_time", lambda: stepped)
    monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: stepped)
    assert psutil.Process(os.getpid()).create_time() - epoch > 1.0  # psutil's epoch start moved with the clock
    assert liveness.start_time(os.getpid()) == me[liveness.TAG_PID_START]
    assert liveness.process_state(me[liveness.TAG_HOST], me[liveness.TAG_PID], me[liveness.TAG_PID_START]) == "alive"
    # a stamp of an older version (epoch seconds) still compares, on the same clock
    legacy = f"{psutil.Process(os.getpid()).create_time():.2f}"
    assert liveness.process_state(me[liveness.TAG_HOST], me[liveness.TAG_PID], legacy) == "alive"


def test_an_invocation_closes_what_a_killed_one_left_open(store, tmp_path, monkeypatch, capsys):
    uri, client, exp = store
    dead = {**liveness.identity(), liveness.TAG_PID: str(_dead_pid())}
    parent = client.create_run(exp, tags={"cellatlas.kind": "pipeline", **dead}, run_name="killed-invocation")
    child = _run(client, exp, {**dead, "mlflow.parentRunId": parent.info.run_id})
    invocation.start_parent(uri=uri, experiment="t", config={"a": 1}, workdir=tmp_path)
    for var in (tracking.ENV_PARENT, tracking.ENV_URI, tracking.ENV_EXPERIMENT, tracking.ENV_CONFIG_HASH,
                tracking.ENV_GIT_COMMIT, tracking.ENV_INVOCATION, liveness.ENV_SNAKEMAKE_PID,
                liveness.ENV_SNAKEMAKE_HOST, liveness.ENV_SNAKEMAKE_START):
        monkeypatch.setenv(var, os.environ[var])
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"
    assert "marked 2 run(s) KILLED whose process is gone" in capsys.readouterr().err
    invocation.end_parent("FAILED")
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")


def test_a_job_whose_snakemake_process_is_gone_stops_itself(store, tmp_path):
    """The orphan of a killed Snakemake ends its run KILLED and writes no record."""
    uri, client, _ = store
    snakemake_stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    job = f"""
import sys, time
sys.path.insert(0, {str(Path(tracking.__file__).parents[1])!r})
from cellatlas import tracking
with tracking.stage_run("embed", "d", params={{}}, record={str(tmp_path / 'run.json')!r}):
    time.sleep(60)
"""
    env = {**os.environ, tracking.ENV_URI: uri, tracking.ENV_EXPERIMENT: "t",
           liveness.ENV_SNAKEMAKE_PID: str(snakemake_stand_in.pid), liveness.ENV_SNAKEMAKE_HOST: socket.gethostname(),
           liveness.ENV_SNAKEMAKE_START: liveness.start_time(snakemake_stand_in.pid)}
    proc = subprocess.Popen([sys.executable, "-c", job], env=env, stderr=subprocess.PIPE, text=True)
    exp = None
    deadline = time.monotonic() + 60
    while not exp or not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.5)
        exp = client.get_experiment_by_name("t")
    t0 = time.monotonic()
    snakemake_stand_in.kill()
    snakemake_stand_in.wait()
    assert proc.wait(30) != 0 and time.monotonic() - t0 < 15
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED" and "Snakemake process" in run.data.tags["cellatlas.notes"]
    assert not (tmp_path / "run.json").exists()


# -- a lost tracking store ------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A plain MLflow server on 127.0.0.1 that the test may kill; MLflow gives up at once."""
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "CELLATLAS_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # as cellatlas-server runs it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            tracking.check_server(uri, attempts=1, timeout=2)
            break
        except Exception:
            assert time.monotonic() < deadline and proc.poll() is None, "the MLflow server did not start"
            time.sleep(1)
    monkeypatch.setenv(tracking.ENV_URI, uri)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    yield {"uri": uri, "stop": stop, "db": tmp_path / "server.db"}
    stop()


class _Job:
    """What Snakemake hands a rule's script: the parts the runner reads."""

    def __init__(self, folder: Path):
        self.log = [str(folder / "job.log")]
        self.output = _Files(h5ad=str(folder / "out.tsv"), run=str(folder / "run.json"))
        self.input = _Files()
        self.params = _Files()
        self.wildcards = _Files(dataset="d")
        self.threads = 1


class _Files(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.server
def test_a_server_lost_in_the_middle_of_a_job_ends_it_with_one_line(server, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from cellatlas.runner import run_stage
    from cellatlas.stage import Result

    monkeypatch.chdir(tmp_path)
    job = _Job(tmp_path)

    def compute(smk, live):
        server["stop"]()  # the outage, after the job's own check of the server passed
        return Result(tables={"h5ad": pd.DataFrame({"a": [1]})}, metrics={"n": 1})

    with pytest.raises(SystemExit) as exit_:
        run_stage(job, "qc", compute, step="qc")
    sys.stderr = sys.__stderr__
    assert exit_.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith("cellatlas error in stage qc: lost the MLflow tracking store " + server["uri"])
    assert "in job qc:d" in line and "rerun when the store is back" in line
    assert not Path(job.output.run).exists()
    assert "Traceback" in Path(job.log[0]).read_text()  # the whole story stays in the job's log


@pytest.mark.server
def test_a_job_that_passed_the_server_check_just_before_the_outage_ends_with_one_line(server, tmp_path, monkeypatch,
                                                                                      capsys):
    from cellatlas.runner import run_stage

    monkeypatch.chdir(tmp_path)
    check = tracking.check_server

    def check_then_outage(uri, **kw):
        check(uri, **kw)
        server["stop"]()

    monkeypatch.setattr(tracking, "check_server", check_then_outage)
    with pytest.raises(SystemExit):
        run_stage(_Job(tmp_path), "qc", lambda smk, live: pytest.fail("the stage must not compute"), step="qc")
    sys.stderr = sys.__stderr__
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith("cellatlas error in stage qc: lost the MLflow tracking store " + server["uri"])


@pytest.mark.server
def test_the_end_of_an_invocation_survives_a_dead_server(server, tmp_path, monkeypatch, capsys):
    invocation.start_parent(uri=server["uri"], experiment="t", config={"a": 1}, workdir=tmp_path)
    for var in (tracking.ENV_PARENT, tracking.ENV_URI, tracking.ENV_EXPERIMENT, tracking.ENV_CONFIG_HASH,
                tracking.ENV_GIT_COMMIT, tracking.ENV_INVOCATION, liveness.ENV_SNAKEMAKE_PID,
                liveness.ENV_SNAKEMAKE_HOST, liveness.ENV_SNAKEMAKE_START):
        monkeypatch.setenv(var, os.environ[var])
    server["stop"]()
    invocation.end_parent("FINISHED", results=tmp_path)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cellatlas")]
    assert len(err) == 1 and "could not close the invocation's run" in err[0] and server["uri"] in err[0]


@pytest.mark.parametrize("uri", ["foo://somewhere", "s3://bucket/runs"])
def test_a_uri_mlflow_cannot_track_to_is_one_line(uri):
    from cellatlas.errors import TrackingError

    with pytest.raises(TrackingError) as err:
        tracking.check_server(uri)
    assert "\n" not in str(err.value) and f"'{uri}'" in str(err.value) and "schemes: " in str(err.value)


# -- model files checked before a job loads them --------------------------------------------


def test_a_model_file_changed_after_its_job_is_refused(store, tmp_path, monkeypatch):
    import joblib

    from cellatlas.modelstore import ModelIntegrityError
    from cellatlas.runner import check_model_inputs

    uri, client, _ = store
    monkeypatch.setenv(tracking.ENV_URI, uri)
    folder = tmp_path / "models" / "knn"
    folder.mkdir(parents=True)
    joblib.dump({"weights": [1, 2]}, folder / "model.joblib")
    with tracking.stage_run("classify", "d", params={}, record=folder / "run.json") as run:
        run.set_file_digest(folder / "model.joblib")
    check_model_inputs(client, {"model_knn": str(folder / "model.joblib")})
    assert json.loads((folder / "run.json").read_text())["files_sha256"]["model.joblib"]
    joblib.dump({"weights": [6, 6]}, folder / "model.joblib")
    with pytest.raises(ModelIntegrityError, match=r"model file '.*model.joblib': its bytes do not match .* not loaded"):
        check_model_inputs(client, {"model_knn": str(folder / "model.joblib")})
    # a file whose run recorded nothing (an earlier version wrote it) is not trusted either
    (folder / "run.json").write_text(json.dumps({"run_id": ""}))
    with pytest.raises(ModelIntegrityError, match="recorded no digest; rerun that job"):
        check_model_inputs(client, {"model_knn": str(folder / "model.joblib")})


# -- SIGKILL of a job and of Snakemake, in a real workflow ----------------------------------

#: a chain whose embed job (t-SNE, UMAP) runs long enough to be caught running
CHAIN = {"datasets": {"d": {"source": {"kind": "simulate", "n_cells": 2500, "n_genes": 800, "n_types": 3,
                                       "n_donors": 2, "n_batches": 1, "seed": 1}, "label_key": "cell_type"}}}


def _start(workdir: Path) -> subprocess.Popen:
    from workflow_utils import snakemake_command

    cmd, env = snakemake_command("--cores", "1")
    # a file, not a pipe: jobs inherit it and may outlive Snakemake
    out = (workdir / "snakemake.out").open("w")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _running_job(workdir: Path, stage: str, proc: subprocess.Popen):
    """The RUNNING run of ``stage`` once its job has started."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        # once a job has finished the store is made (opening it while it is made races its migrations)
        if (workdir / "results" / "d" / "ingest" / "run.json").exists():
            client = MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
            exp = client.get_experiment_by_name("cellatlas")
            runs = client.search_runs([exp.experiment_id], f"tags.`cellatlas.stage` = '{stage}' and "
                                      "attributes.status = 'RUNNING'") if exp else []
            if runs:
                return client, exp.experiment_id, runs[0]
        time.sleep(0.3)
    raise AssertionError(f"no {stage} job seen running: " + (workdir / "snakemake.out").read_text()[-3000:])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One workdir for the kill tests, in order: the second starts where the first left off."""
    from workflow_utils import make_workdir

    return make_workdir(tmp_path_factory.mktemp("kill") / "wf", CHAIN)


@pytest.mark.workflow
def test_a_job_killed_with_sigkill_leaves_no_run_running(chain):
    w = chain
    proc = _start(w)
    client, exp, run = _running_job(w, "embed", proc)
    os.kill(int(run.data.tags[liveness.TAG_PID]), signal.SIGKILL)  # as SLURM does past a job's memory
    assert proc.wait(300) != 0
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'"), (w / "snakemake.out").read_text()[-3000:]
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and "at its end" in killed.data.tags["cellatlas.notes"]
    (parent,) = client.search_runs([exp], "tags.`cellatlas.kind` = 'pipeline'")
    assert parent.info.status == "FAILED"
    assert not (w / "results" / "d" / "embed.h5ad").exists()


@pytest.mark.workflow
def test_after_snakemake_is_killed_its_job_stops_and_the_next_invocation_closes_the_rest(chain):
    from workflow_utils import snakemake

    w = chain
    proc = _start(w)
    client, exp, orphan = _running_job(w, "embed", proc)
    proc.kill()  # SIGKILL: no onerror hook, the lock stays, the job carries on
    proc.wait()
    deadline = time.monotonic() + 60
    while client.get_run(orphan.info.run_id).info.status == "RUNNING":
        assert time.monotonic() < deadline, "the orphaned job did not stop"
        time.sleep(0.5)
    stopped = client.get_run(orphan.info.run_id)
    assert stopped.info.status == "KILLED" and "its Snakemake process" in stopped.data.tags["cellatlas.notes"]
    assert not (w / "results" / "d" / "embed" / "run.json").exists()
    (parent,) = client.search_runs([exp], "tags.`cellatlas.kind` = 'pipeline' and attributes.status = 'RUNNING'")
    assert parent.data.tags["cellatlas.pid"] == str(proc.pid)  # nobody could close it: the next invocation does

    assert snakemake(w, "--unlock").returncode == 0
    r = snakemake(w, "--cores", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "marked 1 run(s) KILLED whose process is gone" in r.stderr
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    embeds = client.search_runs([exp], "tags.`cellatlas.stage` = 'embed' and attributes.status = 'FINISHED'")
    assert len(embeds) == 1  # one result, one finished run: the orphan wrote nothing
    assert not list((w / ".snakemake" / "cellatlas-scratch").glob("*"))
