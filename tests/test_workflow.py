"""The real Snakemake workflow on small configs: outputs, MLflow runs, reruns, lint, bad input."""

import json
import re

import anndata as ad
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import adjusted_rand_score

from conftest import ROOT, SHARED_DATA
from workflow_utils import make_workdir, snakemake, write_config

pytestmark = pytest.mark.workflow
STAGES = ("ingest", "qc", "normalize", "embed", "cluster")

CONFIG = {
    "datasets": {
        "pbmc68k": {
            "source": {"kind": "scanpy", "name": "pbmc68k_reduced"},
            "matrix": "raw",
            "values": "lognorm",
            "label_key": "bulk_labels",
        },
        # above scanpy's 4,096-cell switch to pynndescent for the kNN graph
        "sim5k": {
            "source": {"kind": "simulate", "n_cells": 5200, "n_genes": 1500, "n_types": 5, "n_donors": 4,
                       "n_batches": 2, "doublet_rate": 0.03, "batch_sd": 0.05, "donor_sd": 0.05, "seed": 7},
            "label_key": "cell_type",
            "batch_key": "batch",
            "donor_key": "donor",
        },
    },
    "cluster": {"resolutions": [0.5, 1.0], "marker_resolution": 0.5, "marker_method": "t-test"},
}


def _client(workdir):
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def _runs(workdir):
    client = _client(workdir)
    exp = client.get_experiment_by_name("cellatlas")
    return client.search_runs([exp.experiment_id], max_results=1000)


def _jobs(dry_run_stdout):
    """Rule names of the job-stats table of a dry run."""
    table = dry_run_stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = make_workdir(tmp_path_factory.mktemp("wf"), CONFIG)
    r = snakemake(w, "--cores", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    return w


def test_lint_is_clean():
    r = snakemake(ROOT, "--lint")
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_stage_writes_outputs_and_figures(workdir):
    for ds in CONFIG["datasets"]:
        for stage in STAGES:
            assert (workdir / "results" / ds / f"{stage}.h5ad").stat().st_size > 0
            assert (workdir / "results" / ds / stage / "run.json").exists()
        for fig in ("qc/histograms.png", "qc/scatter.png", "normalize/hvg.png", "embed/umap.png", "embed/tsne.png",
                    "embed/pca_variance.png", "cluster/umap_leiden.png"):
            assert (workdir / "results" / ds / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = ad.read_h5ad(workdir / "results" / "sim5k" / "cluster.h5ad")
    assert {"X_pca", "X_umap", "X_tsne"} <= set(final.obsm)
    assert {"leiden_r0.5", "leiden_r1", "doublet_score"} <= set(final.obs)
    assert "counts" in final.layers


def test_summary_metrics(workdir):
    s = pd.read_csv(workdir / "results" / "summary.tsv", sep="\t").set_index("dataset")
    assert s.loc["sim5k", "cells_in"] == 5200 and 4800 < s.loc["sim5k", "cells_kept"] <= 5200
    assert 0 < s.loc["sim5k", "n_hvg"] <= s.loc["sim5k", "genes_kept"]
    assert s.loc["sim5k", "best_ari"] > 0.85
    assert s.loc["pbmc68k", "cells_in"] == 700 and s.loc["pbmc68k", "best_ari"] > 0.3
    qc = json.loads((workdir / "results" / "pbmc68k" / "qc" / "run.json").read_text())
    assert "doublets_predicted" not in qc["metrics"]  # no count-based QC on log-normalized input


def test_mlflow_parent_with_one_finished_child_per_stage(workdir):
    runs = _runs(workdir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        [f"{s}:{d}" for s in STAGES for d in CONFIG["datasets"]] + ["summary"]
    )
    assert all(r.info.status == "FINISHED" for r in children)
    for ds in CONFIG["datasets"]:
        rec = json.loads((workdir / "results" / ds / "cluster" / "run.json").read_text())
        run = _client(workdir).get_run(rec["run_id"])
        assert run.data.tags["cellatlas.dataset"] == ds
        assert run.data.params["cluster.resolutions"] == "[0.5, 1.0]"
        assert run.data.metrics["best_ari"] == pytest.approx(rec["metrics"]["best_ari"])
        assert {"cellatlas.config_hash", "cellatlas.git_commit"} <= set(run.data.tags)
    artifacts = {a.path for a in _client(workdir).list_artifacts(parents[0].info.run_id)}
    assert {"config.json", "summary.tsv"} <= artifacts


def test_reruns_only_what_changed(workdir):
    r = snakemake(workdir, "--cores", "2")
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr
    changed = json.loads(json.dumps(CONFIG))
    changed["cluster"]["resolutions"] = [0.5, 2.0]
    write_config(workdir, changed)
    try:
        r = snakemake(workdir, "--cores", "2", "--dry-run")
        assert r.returncode == 0, r.stderr
        assert _jobs(r.stdout) == {"cluster", "summary", "all"}
    finally:
        write_config(workdir, CONFIG)


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["qc"] = {"mode": "strict"}
    w = make_workdir(tmp_path / "w", cfg)
    r = snakemake(w, "--cores", "1")
    assert r.returncode != 0
    assert "config key 'qc.mode': 'strict' is not one of ['mad', 'fixed']" in r.stderr
    assert not (w / "results").exists()


def test_missing_source_file_is_named_before_any_job(tmp_path):
    cfg = {"datasets": {"gone": {"source": {"kind": "h5ad", "path": "data/nope.h5ad"}}}}
    w = make_workdir(tmp_path / "w", cfg)
    r = snakemake(w, "--cores", "1")
    assert r.returncode != 0
    assert "dataset 'gone': source.path 'data/nope.h5ad' does not exist" in r.stderr
    assert not (w / "results").exists()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("negative", "cellatlas error in stage ingest: dataset 'bad', file 'data/bad.csv': 1 negative values"),
        ("fraction", "cellatlas error in stage ingest: dataset 'bad', file 'data/bad.csv': non-integer values where counts are required"),
        ("label", "cellatlas error in stage ingest: dataset 'bad', file 'data/bad.csv': label_key 'cell_type' is not an obs column"),
        ("no_cells", "cellatlas error in stage qc: dataset 'bad': no cells left after QC"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, kind, expected):
    from cellatlas.simulate import simulate_counts

    frame = simulate_counts(n_cells=120, n_genes=150, seed=0).to_df()
    if kind == "negative":
        frame.iloc[3, 4] = -2
    if kind == "fraction":
        frame.iloc[3, 4] = 0.5
    entry = {"source": {"kind": "csv", "path": "data/bad.csv"}}
    if kind == "label":
        entry["label_key"] = "cell_type"
    cfg = {"datasets": {"bad": entry}}
    if kind == "no_cells":
        cfg["qc"] = {"mode": "fixed", "fixed": {"min_genes": 100000}}
    w = make_workdir(tmp_path / "w", cfg)
    (w / "data").mkdir()
    frame.to_csv(w / "data" / "bad.csv")
    r = snakemake(w, "--cores", "1")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("cellatlas error")]
    assert lines and lines[0].startswith(expected), r.stderr[-3000:]
    stage = "qc" if kind == "no_cells" else "ingest"
    assert not (w / "results" / "bad" / f"{stage}.h5ad").exists()
    assert not (w / "results" / "bad" / stage / "run.json").exists()
    runs = {r.info.run_name: r for r in _runs(w)}
    assert runs[f"{stage}:bad"].info.status == "FAILED"
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs.values())


@pytest.mark.skipif(not (SHARED_DATA / "pbmc3k").is_dir(), reason="../shared/data/pbmc3k is not present")
def test_pbmc3k_clusters_match_published_annotation(tmp_path):
    """Both Cell Ranger folder and h5ad read; Leiden reaches ARI >= 0.70 against celltype_seurat."""
    h5ad = SHARED_DATA / "pbmc3k" / "pbmc3k_counts_labelled.h5ad"
    cfg = {
        "datasets": {
            "pbmc3k": {"source": {"kind": "h5ad", "path": str(h5ad)}, "label_key": "celltype_seurat"},
            "pbmc3k_mtx": {"source": {"kind": "10x_mtx", "path": str(SHARED_DATA / "pbmc3k" / "filtered_feature_bc_matrix")}},
        },
        "cluster": {"marker_method": "t-test"},
    }
    w = make_workdir(tmp_path / "w", cfg)
    r = snakemake(w, "--cores", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    s = pd.read_csv(w / "results" / "summary.tsv", sep="\t").set_index("dataset")
    assert s.loc["pbmc3k", "best_ari"] >= 0.70, s.loc["pbmc3k"]
    labels = ad.read_h5ad(h5ad).obs["celltype_seurat"]
    mtx = ad.read_h5ad(w / "results" / "pbmc3k_mtx" / "cluster.h5ad")
    truth = labels.reindex(mtx.obs_names).astype(str)
    best = max(adjusted_rand_score(truth, mtx.obs[c].astype(str)) for c in ("leiden_r0.5", "leiden_r1"))
    assert best >= 0.70
