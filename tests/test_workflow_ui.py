"""Comparing runs, as a user does it: a second invocation, the cross-invocation command, a copied
results folder, and the MLflow UI in a real browser (Debian's Chromium driven by Playwright).

Runs after test_workflow.py on the session's shared workflow run (conftest.workdir), which it
extends by one invocation. Screenshots go to test-artifacts/ui/ (CELLATLAS_TEST_ARTIFACTS).
Where Chromium cannot be installed the browser test skips with the reason; with
CELLATLAS_REQUIRE_BROWSER=1 (CI) that is a failure.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient
from workflow_utils import CONFIG, child_commands, snakemake, write_config

pytestmark = pytest.mark.workflow
CHANGED = "classify.classifiers.knn.params.n_neighbors"
ARTIFACTS = Path(os.environ.get("CELLATLAS_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"


def _client(workdir):
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def _parents(workdir):
    client = _client(workdir)
    exp = client.get_experiment_by_name("cellatlas")
    return client.search_runs([exp.experiment_id], "tags.`cellatlas.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def two_invocations(workdir):
    """The shared run, then a second invocation named knn7 whose config differs in one classifier parameter."""
    changed = json.loads(json.dumps(CONFIG))
    changed["classify"]["classifiers"]["knn"]["params"] = {"n_neighbors": 7}
    write_config(workdir, changed)
    r = snakemake(workdir, "--cores", "2", "--config", "run_name=knn7")
    assert r.returncode == 0, r.stderr[-4000:]
    first, second = _parents(workdir)[-2:]
    return workdir, first, second, r


def test_a_second_invocation_records_what_changed_and_reuses_the_rest(two_invocations):
    workdir, first, second, r = two_invocations
    assert second.info.run_name == "knn7" and second.info.status == "FINISHED"
    assert second.data.params[CHANGED] == "7" and CHANGED not in first.data.params
    assert second.data.tags["cellatlas.changes"] == f"{CHANGED}: (unset) -> 7"
    assert first.info.run_id in second.data.tags["cellatlas.previous_run"]
    # headline metrics of every dataset also for results reused from the first invocation
    assert {k.split("/")[0] for k in first.data.metrics} == {k.split("/")[0] for k in second.data.metrics}
    assert second.data.metrics["sim5k/best_ari"] == first.data.metrics["sim5k/best_ari"]
    knn = "sim5k/cell_type/knn/macro_f1"
    assert second.data.metrics[knn] != first.data.metrics[knn]
    runs = pd.read_csv(_client(workdir).download_artifacts(second.info.run_id, "runs.tsv", str(workdir)), sep="\t")
    rerun = set(runs.loc[~runs["reused"], "run_name"])
    assert "classify:sim5k/cell_type/knn" in rerun and "cluster:sim5k" not in rerun
    assert set(runs.loc[runs["reused"], "invocation"]) == {first.info.run_id}
    # the terminal names the invocation, the UI and the change
    out = r.stdout + r.stderr
    assert f"invocation 'knn7' (MLflow run {second.info.run_id}" in out
    assert "cellatlas-ui" in out and "viewStateShareKey=cellatlas-models" in out and CHANGED in out
    assert "gpu=1" not in out  # no GPU asked for on a machine without one


def _user_env():
    """The environment of a user's shell: no tracking variables of the test session's own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CELLATLAS_"))}


def test_the_compare_command_shows_the_change_and_the_metrics_that_moved(two_invocations, tmp_path):
    workdir, first, second, _ = two_invocations
    r = subprocess.run([sys.executable, "-m", "cellatlas.compare_runs", "--results", str(workdir / "results"),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=_user_env())
    assert r.returncode == 0, r.stderr
    assert CHANGED in r.stdout and "knn7" in r.stdout and "sim5k/cell_type/knn/macro_f1" in r.stdout
    table = pd.read_csv(tmp_path / "comparison.tsv", sep="\t").set_index("invocation")
    # only what differs between invocations, by default; the knn model moved, the clusters did not
    assert "sim5k/cell_type/knn/macro_f1" in table.columns and "sim5k/best_ari" not in table.columns
    assert table.loc["knn7", "changed"] == f"{CHANGED}: (unset) -> 7"
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = subprocess.run([sys.executable, "-m", "cellatlas.compare_runs", "sim5k/*ari", "--results",
                             str(workdir / "results"), "--out", str(tmp_path / "ari")], capture_output=True, text=True,
                            env=_user_env())
    assert chosen.returncode == 0 and "sim5k/best_ari" in chosen.stdout and "knn/macro_f1" not in chosen.stdout


def test_a_copied_results_folder_shows_its_artifacts_and_writes_only_into_itself(two_invocations, tmp_path):
    workdir, _, second, _ = two_invocations
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("locks"))
    original = sorted(p for p in (workdir / "results" / "mlflow-artifacts").rglob("*"))
    r = snakemake(copy, "--cores", "1", "--forcerun", "summary", "--config", "run_name=from-copy")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p for p in (workdir / "results" / "mlflow-artifacts").rglob("*")) == original
    client = _client(copy)
    for run in client.search_runs([client.get_experiment_by_name("cellatlas").experiment_id], max_results=1000):
        assert run.info.artifact_uri.startswith((copy / "results").as_uri()), run.info.artifact_uri
    assert {a.path for a in client.list_artifacts(second.info.run_id)} >= {"runs.tsv", "models.tsv"}
    assert (copy / "results" / "mlflow-artifacts").as_uri() in client.get_experiment_by_name("cellatlas").artifact_location
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{copy / 'results' / 'mlflow.db'}")
    from cellatlas.modelstore import load_model

    model = load_model("models:/cellatlas.sim5k.cell_type@best")
    assert model.metadata.run_id


def test_the_html_report_has_an_overview_captions_tables_and_versions(two_invocations):
    workdir = two_invocations[0]
    r = snakemake(workdir, "--report", "report.html")
    assert r.returncode == 0, r.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    assert "Start with <strong>Summary</strong>" in html  # the overview page
    for caption in ("Pooled out-of-fold confusion matrix", "Marker genes of the Leiden clusters of",
                    "Training and validation loss per epoch of the VAE", "query cells placed in the reference UMAP"):
        assert caption in html, caption
    # the summary tables as HTML pages, which the report shows inline (a TSV would only download)
    for table in ("summary.html", "models.html", "atlas.html", "versions.html"):
        assert f"results/report/{table}" in html
    versions = (workdir / "results" / "report" / "versions.html").read_text()
    assert "<td>scanpy</td>" in versions and "<td>mlflow</td>" in versions


# -- the browser -----------------------------------------------------------------------------------


def _chromium() -> str | None:
    """Debian's Chromium (installed as root if missing), or None with the reason kept."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(cmd, env=env, capture_output=True, timeout=900, check=False)
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(two_invocations):
    browser = _chromium()
    if browser is None:
        reason = "no Chromium, and it cannot be installed here (needs root and apt-get)"
        if os.environ.get("CELLATLAS_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required but impossible: {reason}")
        pytest.skip(reason)
    workdir = two_invocations[0]
    port = _free_port()
    log = open(workdir / "ui.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "cellatlas.ui", "--results", str(workdir / "results"),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=_user_env())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"mlflow ui did not start: {(workdir / 'ui.log').read_text()[-2000:]}")
        yield browser, base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_ui_runs_no_job_workers(ui):
    """MLflow's GenAI job runner (seven processes importing MLflow) stays off for the UI too."""
    commands = child_commands(ui[2])
    assert commands, "the UI's web server should be there"
    assert not [c for c in commands if "huey" in c]


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    browser, base, _ = ui
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, headless=True)
        tab = chromium.new_page(viewport={"width": 1500, "height": 900})
        tab.base = base
        yield tab
        chromium.close()


def _open(page, path: str, *, wait_for: str, shot: str):
    # the UI polls for ever, so "network idle" never comes: wait for what the test needs instead
    page.goto(page.base + path, wait_until="domcontentloaded")
    page.get_by_text(wait_for).first.wait_for(timeout=60_000)
    close = page.get_by_role("button", name="Close")  # the assistant's side panel
    if close.count():
        close.first.click()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"))
    return page.inner_text("body")


def _view(run, key: str) -> str:
    return f"/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def test_the_runs_page_shows_the_named_invocations_with_their_headline_metrics(page, two_invocations):
    _, first, second, _ = two_invocations
    text = _open(page, _view(first, "cellatlas-invocations"), wait_for="knn7", shot="invocations")
    assert first.info.run_name in text and "knn7" in text
    assert "sim5k/cell_type/best_macro_f1" in text and "atlas/a/sim5k_q/latent/accuracy" in text
    assert f"{CHANGED}: (unset) -> 7" in text


def test_models_are_grouped_by_task_and_ranked(page, two_invocations):
    text = _open(page, _view(two_invocations[1], "cellatlas-models"), wait_for="cellatlas.task: cell_type", shot="models")
    assert "Group by: cellatlas.dataset" in text and "cellatlas.task: program" in text
    for model in ("logistic_regression", "knn", "mlp"):
        assert f"classify:sim5k/cell_type/{model}" in text
    assert "cv/macro_f1" in text and "cv/r2" in text
    assert "cellatlas.invocation" in text and "knn7" in text  # which invocation made each model's run


def test_integration_methods_grouped_by_dataset(page, two_invocations):
    text = _open(page, _view(two_invocations[1], "cellatlas-integration"), wait_for="Group by: cellatlas.dataset",
                 shot="integration")
    assert "Group: sim5k" in text
    for method in ("pca", "harmony", "bbknn", "vae", "vae_labels"):
        assert f"integrate:sim5k/{method}" in text, method
    assert "bio_conservation" in text and "heldout/total" in text


def test_runs_grouped_by_stage(page, two_invocations):
    text = _open(page, _view(two_invocations[1], "cellatlas-stages"), wait_for="Group by: cellatlas.stage", shot="stages")
    for stage in ("ingest", "integrate", "classify", "regress", "train", "atlas", "summary"):
        assert f"Group: {stage}" in text, stage


def test_a_chart_of_one_tasks_cross_validated_macro_f1_shows_every_model(page, two_invocations):
    _open(page, _view(two_invocations[1], "cellatlas-scores"), wait_for="cellatlas.task: cell_type", shot="scores-table")
    page.locator("input[type=radio][value=CHART]").dispatch_event("click")
    page.get_by_placeholder("Search metric charts").fill("cv/macro_f1")
    chart = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(has_text="cv/macro_f1").first
    if not chart.count():  # the card's test id differs between MLflow releases: any card titled so
        chart = page.get_by_text("cv/macro_f1", exact=True).first
    chart.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(ARTIFACTS / "scores-chart.png"))
    text = page.inner_text("body")
    for model in ("logistic_regression", "knn", "mlp"):
        assert f"classify:sim5k/cell_type/{model}" in text


def test_the_compare_view_of_two_invocations_shows_the_param_and_the_metrics(page, two_invocations):
    _, first, second, _ = two_invocations
    runs = json.dumps([first.info.run_id, second.info.run_id]).replace(" ", "")
    exp = json.dumps([first.info.experiment_id])
    text = _open(page, f"/#/compare-runs?runs={runs}&experiments={exp}", wait_for="Run details", shot="compare")
    assert "knn7" in text and first.info.run_name in text
    assert CHANGED in text and "sim5k/cell_type/knn/macro_f1" in text
    for toggle in page.get_by_text("Show diff only").all():  # what differs, params and metrics
        toggle.click()
    page.wait_for_timeout(1000)
    page.get_by_text("Parameters", exact=True).first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "compare-diff.png"), full_page=True)
    text = page.inner_text("body")
    assert CHANGED in text and "sim5k/cell_type/knn/macro_f1" in text and "seed" not in text.split("Parameters")[1][:400]
