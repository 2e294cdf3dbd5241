"""The stage contract, the naming scheme, the invocation's parent run, the movable store and the
cross-invocation comparison, on real SQLite MLflow stores (no workflow run)."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cellatlas import invocation, naming, tracking
from cellatlas.runner import log_result, write_result
from cellatlas.stage import DatasetInput, Model, Result, check_outputs, plot
from cellatlas.store import relocate

ENV = (tracking.ENV_PARENT, tracking.ENV_URI, tracking.ENV_EXPERIMENT, tracking.ENV_CONFIG_HASH, tracking.ENV_GIT_COMMIT,
       tracking.ENV_INVOCATION)


@pytest.fixture
def env():
    """start_parent exports the run ids for the jobs; each test starts without them and leaves none."""
    saved = {var: os.environ.pop(var) for var in ENV if var in os.environ}
    yield
    for var in ENV:
        os.environ.pop(var, None)
    os.environ.update(saved)


def test_every_output_gets_exactly_one_entry():
    result = Result(tables={"a": pd.DataFrame()}, figures={"b": lambda path: None})
    check_outputs(result, {"a": "a.tsv", "b": "b.png", "run": "run.json"}, where="job")
    with pytest.raises(RuntimeError, match=r"returned no \['c'\] and undeclared \[\]"):
        check_outputs(result, {"a": "a.tsv", "b": "b.png", "c": "c.tsv", "run": "run.json"}, where="job")
    with pytest.raises(RuntimeError, match=r"undeclared \['b'\]"):
        check_outputs(result, {"a": "a.tsv", "run": "run.json"}, where="job")
    # a model without a declared file is only logged
    check_outputs(Result(models={"model": Model(object())}), {"run": "run.json"}, where="job")


def test_the_runner_writes_each_entry_to_its_output(tmp_path):
    import anndata as ad

    from cellatlas import plotting

    result = Result(
        tables={"t": pd.DataFrame({"x": [1.5, 2.0]})},
        figures={"f": plot(plotting.pca_variance, np.array([0.5, 0.3]), title="t")},
        data={"d": ad.AnnData(np.ones((2, 3), dtype=np.float32))},
        records={"r": {"k": [1, 2]}},
        texts={"h": "<p>x</p>"},
    )
    scratch = tmp_path / "scratch.bin"
    scratch.write_bytes(b"ckpt")
    result.files["c"] = scratch
    out = {"t": tmp_path / "t.tsv", "f": tmp_path / "f.png", "d": tmp_path / "d.h5ad", "r": tmp_path / "r.json",
           "h": tmp_path / "h.html", "c": tmp_path / "c.ckpt"}
    write_result(result, {k: str(v) for k, v in out.items()})
    assert pd.read_csv(out["t"], sep="\t")["x"].tolist() == [1.5, 2.0]
    assert out["f"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ad.read_h5ad(out["d"]).shape == (2, 3)
    assert json.loads(out["r"].read_text()) == {"k": [1, 2]} and out["h"].read_text() == "<p>x</p>"
    assert out["c"].read_bytes() == b"ckpt" and not scratch.exists()


def test_one_naming_scheme_for_cross_validated_models(tmp_path, env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    invocation.start_parent(uri=uri, experiment="t", config={"seed": 0}, workdir=tmp_path)
    data = tmp_path / "normalize.h5ad"
    data.write_bytes(b"cells")
    result = Result(metrics={"split": "grouped", "time/cv_fit_seconds": 2.0},
                    cv={"macro_f1": [0.8, 0.9, 1.0], "accuracy": [0.5, 0.5, 0.5]},
                    tables={"folds": pd.DataFrame({"fold": [0, 1, 2]})}, inputs=[DatasetInput("sim", str(data))])
    outputs = {"folds": str(tmp_path / "folds.tsv"), "run": str(tmp_path / "run.json")}
    with tracking.stage_run("classify", "sim", params={}, record=outputs["run"], name="classify:sim/t/m") as run:
        write_result(result, outputs)
        log_result(run, result, outputs, model_name=naming.logged_model("sim", "t", "m"))
    client = MlflowClient(uri)
    rec = json.loads((tmp_path / "run.json").read_text())
    r = client.get_run(rec["run_id"])
    assert r.data.metrics["cv/macro_f1"] == pytest.approx(0.9) and r.data.metrics["cv/macro_f1_sd"] == pytest.approx(0.1)
    assert r.data.metrics["cv/accuracy_sd"] == 0
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "fold/macro_f1")] == [
        (0, 0.8), (1, 0.9), (2, 1.0)]
    assert r.data.tags["cellatlas.invocation"].startswith("pipeline-")  # which invocation made it
    assert r.data.tags["cellatlas.split"] == "grouped" and "folds.tsv" in {a.path for a in client.list_artifacts(r.info.run_id)}
    (inp,) = r.inputs.dataset_inputs
    assert inp.dataset.name == "sim" and json.loads(inp.dataset.source) == {"uri": str(data)}
    from cellatlas.datasets import file_digest

    assert inp.dataset.digest == file_digest(data) and len(inp.dataset.digest) == 12
    assert rec["metrics"]["cv/macro_f1"] == pytest.approx(0.9) and rec["inputs"][0]["digest"] == inp.dataset.digest


def test_the_parent_records_changes_headlines_and_reuse(tmp_path, env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame({"dataset": ["d"], "best_ari": [0.81234], "cells_kept": [90]}).to_csv(results / "summary.tsv", sep="\t", index=False)
    pd.DataFrame({"dataset": ["d", "d"], "task": ["t", "t"], "kind": ["classification"] * 2, "model": ["a", "b"],
                  "rank": [1, 2], "macro_f1_mean": [0.9, 0.7]}).to_csv(results / "models.tsv", sep="\t", index=False)
    first = invocation.start_parent(uri=uri, experiment="t", config={"k": {"n": 1}, "seed": 0}, workdir=tmp_path)
    record = tmp_path / "qc" / "run.json"
    with tracking.stage_run("qc", "d", params={}, record=record):
        pass
    invocation.end_parent("FINISHED", results=results, records=[record])
    second = invocation.start_parent(uri=uri, experiment="t", config={"k": {"n": 2}, "seed": 0, "run_name": "two",
                                                                             "keep_intermediate": False},
                                     workdir=tmp_path)
    invocation.end_parent("FINISHED", results=results, records=[record])
    client = MlflowClient(uri)
    one, two = client.get_run(first), client.get_run(second)
    assert one.info.run_name.startswith("pipeline-") and two.info.run_name == "two"
    assert two.data.tags["cellatlas.changes"] == "k.n: 1 -> 2" and first in two.data.tags["cellatlas.previous_run"]
    # run_name names the invocation, keep_intermediate only deletes files: neither is what it computes
    assert "run_name" not in two.data.params and "keep_intermediate" not in two.data.params
    assert two.data.metrics == {"d/best_ari": 0.81234, "d/cells_kept": 90.0, "d/t/best_macro_f1": 0.9,
                                "d/t/margin": pytest.approx(0.2), "d/t/a/macro_f1": 0.9, "d/t/b/macro_f1": 0.7}
    assert two.data.tags["cellatlas.best.d.t"] == "a"
    runs = pd.read_csv(client.download_artifacts(second, "runs.tsv", str(tmp_path)), sep="\t")
    assert runs["reused"].tolist() == [True] and runs["invocation"].tolist() == [first]
    # saved views of the UI's runs page, with this invocation's headline columns
    views = {k: json.loads(v) for k, v in client.get_experiment(two.info.experiment_id).tags.items()
             if k.startswith("mlflow.sharedViewState.")}
    state = json.loads(views["mlflow.sharedViewState.cellatlas-invocations"]["state"])
    assert "metrics.`d/t/best_macro_f1`" in state["selectedColumns"]

    from cellatlas.compare_runs import comparison, invocations

    table = comparison(invocations(client, "t"))
    assert table["invocation"].tolist() == [one.info.run_name, "two"]
    assert table["changed"].tolist() == ["(first)", "k.n: 1 -> 2"]
    # nothing moved between the two: every metric is shown
    assert "d/t/best_macro_f1" in table.columns
    assert list(comparison(invocations(client, "t"), ["*/best_ari"]).columns) == [
        "invocation", "run_id", "start", "config_hash", "d/best_ari", "changed"]


def test_a_moved_store_reads_and_writes_its_own_artifacts(tmp_path, env):
    old = tmp_path / "old" / "results"
    old.mkdir(parents=True)
    uri = f"sqlite:///{old / 'mlflow.db'}"
    invocation.start_parent(uri=uri, experiment="t", config={"seed": 0}, workdir=tmp_path)
    (tmp_path / "a.txt").write_text("artifact")
    with tracking.stage_run("qc", "d", params={}, record=tmp_path / "run.json") as run:
        run.log_artifact(tmp_path / "a.txt")
    invocation.end_parent("FINISHED", results=old)
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    new = tmp_path / "new" / "results"
    shutil.copytree(old, new)
    shutil.rmtree(old)
    assert relocate(new / "mlflow.db") > 0
    assert relocate(new / "mlflow.db") == 0  # already in place
    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    assert client.get_run(run_id).info.artifact_uri.startswith(new.as_uri())
    assert [a.path for a in client.list_artifacts(run_id)] == ["a.txt"]
    assert client.get_experiment_by_name("t").artifact_location == (new / "mlflow-artifacts").as_uri()


def test_a_folder_source_has_a_digest_of_its_files(tmp_path):
    from cellatlas.datasets import file_digest

    folder = tmp_path / "mtx"
    folder.mkdir()
    (folder / "matrix.mtx").write_text("1 2 3")
    (folder / "barcodes.tsv").write_text("AAA")
    before = file_digest(folder)
    assert len(before) == 12 and file_digest(folder) == before
    (folder / "barcodes.tsv").write_text("AAC")
    assert file_digest(folder) != before


def test_headlines_come_only_from_tables_this_configuration_made(tmp_path):
    pd.DataFrame({"dataset": ["d"], "best_ari": [0.5], "config_hash": ["old"]}).to_csv(tmp_path / "summary.tsv",
                                                                                       sep="\t", index=False)
    assert invocation.headline_metrics(tmp_path, "new") == ({}, {})  # a partial run reports no stale figures
    assert invocation.headline_metrics(tmp_path, "old")[0] == {"d/best_ari": 0.5}


def test_a_config_the_tracker_refuses_fails_in_one_line_and_leaves_no_run_running(tmp_path, env):
    from cellatlas.errors import TrackingError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrackingError, match=r"^the invocation's parent run could not record the config in sqlite"):
        invocation.start_parent(uri=uri, experiment="t", config={"subset": {"x" * 300: 1}}, workdir=tmp_path)  # keys: 250 characters at most
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FAILED" and tracking.ENV_PARENT not in os.environ


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_jobs_openmp_threads_sleep_while_they_wait_unless_the_user_says(given, expected):
    """The runner is a script's first import; it sets the wait policy before any OpenMP runtime loads."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; import cellatlas.runner; "
            "print(os.environ['OMP_WAIT_POLICY'], sorted({'torch', 'sklearn', 'numba'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert out == [expected, "[]\n"]


def test_every_stage_script_imports_the_runner_before_anything_else():
    """So that the runner's settings (the OpenMP wait above) precede every library a script loads."""
    import ast
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    late = []
    for script in sorted(scripts.glob("*.py")):
        text = script.read_text()
        if "run_stage(" not in text:
            continue  # download.py: no stage run, no computing library
        imports = [node for node in ast.parse(text).body if isinstance(node, (ast.Import, ast.ImportFrom))
                   and getattr(node, "module", None) != "__future__"]
        first = imports[0]
        if not (isinstance(first, ast.ImportFrom) and first.module == "cellatlas.runner"):
            late.append(script.name)
    assert late == []
