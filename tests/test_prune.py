"""cellatlas-prune: artifacts of superseded runs go, their numbers and every run still in use stay."""

import json
import os

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cellatlas import prune, tracking


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Three runs of one job: the oldest registered, the middle one superseded, the newest in results/."""
    from sklearn.linear_model import LogisticRegression

    from cellatlas.stage import Model

    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "CELLATLAS_"))]:
        monkeypatch.delenv(var)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    (tmp_path / "results").mkdir()
    monkeypatch.setenv(tracking.ENV_URI, uri)
    X = np.random.default_rng(0).normal(size=(30, 3))
    model = Model(LogisticRegression().fit(X, X[:, 0] > 0), flavor="sklearn", input_example=X[:2])
    ids = []
    for k in range(3):
        record = tmp_path / "results" / "d" / "classify" / "run.json" if k == 2 else tmp_path / f"old{k}.json"
        with tracking.stage_run("classify", "d", params={"k": k}, record=record, name="classify:d/label/logreg") as run:
            run.log_metrics({"cv/macro_f1": 0.5 + k / 10})
            (tmp_path / "table.tsv").write_text("a\n1\n")
            run.log_artifact(tmp_path / "table.tsv")
            uri_k = run.log_model(model, name="d-label-logreg")
            if k == 0:
                run.register_model("cellatlas.d.label", uri_k, alias="best")
        ids.append(run.run_id)
    return MlflowClient(uri), ids, tmp_path / "results"


def test_only_the_superseded_run_loses_its_artifacts_and_keeps_its_numbers(runs, capsys, monkeypatch):
    client, (registered, old, current), results = runs
    monkeypatch.chdir(results.parent)
    prune.main(["--results", str(results)])  # a dry run deletes nothing
    assert "would prune classify:d/label/logreg (" + old in capsys.readouterr().out
    assert client.list_artifacts(old)
    prune.main(["--results", str(results), "--yes"])
    assert not client.list_artifacts(old)
    assert client.get_run(old).data.metrics == {"cv/macro_f1": 0.6} and "cellatlas.pruned" in client.get_run(old).data.tags
    assert not client.search_logged_models(experiment_ids=[client.get_run(old).info.experiment_id],
                                           filter_string=f"source_run_id = '{old}'")
    for kept in (registered, current):
        assert {a.path for a in client.list_artifacts(kept)} >= {"table.tsv"}
    from cellatlas.modelstore import load_model

    assert load_model("models:/cellatlas.d.label@best") is not None
    prune.main(["--results", str(results), "--yes"])  # nothing left to do
    assert "0 run(s) pruned" in capsys.readouterr().err
    assert json.loads((results / "d" / "classify" / "run.json").read_text())["run_id"] == current
