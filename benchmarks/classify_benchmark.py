"""Wall time and peak memory of every classifier of the classify stage on 100,000 simulated cells.

    python benchmarks/classify_benchmark.py              # 100,000 cells x 10,000 genes, 20 donors
    python benchmarks/classify_benchmark.py --cells 20000

Runs the real workflow (`--cores 2`) up to the task's comparison: ingest, QC, normalize, the
split, one job per default classifier (grouped 5-fold CV by donor, refit, importance, MLflow
model) and the comparison. Per model it reports Snakemake's own benchmark of the job (wall time,
peak RSS) and the mean fit time per fold, next to the size of the sparse matrix and what the
dense matrix would take, so "never densify all genes" can be read off the peaks.
Writes benchmarks/out/classify_<cells>/result.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from workflow_utils import make_workdir, snakemake  # noqa: E402

MODELS = ("logistic_regression", "linear_svm", "random_forest", "hist_gradient_boosting", "knn")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=10_000)
    args = ap.parse_args()
    out = HERE / "out" / f"classify_{args.cells}"
    out.mkdir(parents=True, exist_ok=True)
    h5ad = out / "input.h5ad"
    if not h5ad.exists():
        code = (
            "import sys; from cellatlas.simulate import simulate_counts; "
            f"simulate_counts(n_cells={args.cells}, n_genes={args.genes}, n_types=10, n_donors=20, n_batches=4, seed=0)"
            ".write_h5ad(sys.argv[1])"
        )
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "workflow" / "scripts")}
        subprocess.run([sys.executable, "-c", code, str(h5ad)], check=True, env=env)
    ds = "bench"
    config = {
        "datasets": {ds: {"source": {"kind": "h5ad", "path": str(h5ad)}, "label_key": "cell_type",
                          "batch_key": "batch", "donor_key": "donor"}},
        "qc": {"doublets": False},  # QC is benchmarked elsewhere; here only the models count
        "classify": {"tasks": {ds: {"cell_type": {"target": "label"}}}},
    }
    work = out / "workflow"
    make_workdir(work, config)
    target = f"results/{ds}/classify/cell_type/comparison/models.tsv"
    t = time.perf_counter()
    r = snakemake(work, "--cores", "2", target, timeout=6 * 3600)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])

    import h5py
    import pandas as pd

    with h5py.File(work / "results" / ds / "normalize.h5ad", "r") as f:
        nnz = f["X"]["data"].shape[0]
        n_obs, n_vars = f["X"].attrs["shape"]
    models = {}
    for m in MODELS:
        with open(work / "results" / ds / "benchmarks" / "classify" / "cell_type" / f"{m}.tsv") as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        folds = pd.read_csv(work / "results" / ds / "classify" / "cell_type" / "models" / m / "folds.tsv", sep="\t")
        models[m] = {
            "job_seconds": float(row["s"]),
            "max_rss_mb": float(row["max_rss"]),
            "fit_seconds_per_fold": round(float(folds["fit_seconds"].mean()), 2),
            "predict_seconds_per_fold": round(float(folds["predict_seconds"].mean()), 2),
            "macro_f1_mean": round(float(folds["macro_f1"].mean()), 4),
            "macro_f1_sd": round(float(folds["macro_f1"].std(ddof=1)), 4),
        }
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "cells_after_qc": n_obs,
        "genes_after_qc": n_vars,
        "nonzeros": int(nnz),
        "sparse_matrix_mb": round(nnz * 8 / 2**20, 1),  # float32 data + int32 indices
        "dense_matrix_would_be_mb": round(n_obs * n_vars * 4 / 2**20, 1),
        "workflow_wall_seconds": round(wall, 1),
        "models": models,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
