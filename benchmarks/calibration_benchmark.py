"""Labels you can trust, measured on real data: each mapping method's calibration and prediction
sets on PBMC 3k's own held-out cells, and what they do to scanpy's pbmc68k_reduced mapped onto it.

    python benchmarks/calibration_benchmark.py                 # needs ../shared/data (PBMC 3k)
    python benchmarks/calibration_benchmark.py --alpha 0.05
    python benchmarks/calibration_benchmark.py --no-scale     # the map's PCA without per-gene scaling

The real workflow with `--cores 2`: PBMC 3k (2,638 cells, the Seurat tutorial's nine labels) through
every stage, its classify task (logistic regression and kNN, 5 stratified folds: one donor), its
VAE, the reference map, each method's calibration (atlas_calibrate) and the mapping of
pbmc68k_reduced (700 PBMCs of another 10x chemistry, log-normalized values, other label names).
Per method: the held-out cells' accuracy, expected calibration error before and after calibration
(Platt scaling), conformal coverage overall and per label; per query: unassigned share and mean set
size. Writes benchmarks/out/calibration_pbmc3k/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from workflow_utils import PBMC68K_TO_PBMC3K as CORRESPONDENCE  # noqa: E402
from workflow_utils import make_workdir, snakemake  # noqa: E402

PBMC3K = HERE.parent.parent / "shared" / "data" / "pbmc3k" / "pbmc3k_counts_labelled.h5ad"
METHODS = ("projection", "latent", "classifier")


def config(alpha: float, scale: bool) -> dict:
    return {
        "embed": {"scale": scale},
        "datasets": {
            "pbmc3k": {"source": {"kind": "h5ad", "path": str(PBMC3K)}, "label_key": "celltype_seurat"},
            "pbmc68k": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}, "matrix": "raw", "values": "lognorm",
                        "label_key": "bulk_labels"},
        },
        "classify": {"tasks": {"pbmc3k": {"cell_type": {"target": "label", "models": ["logistic_regression", "knn"]}}}},
        "train": {"embedding": {"datasets": ["pbmc3k"]}},
        "integration": {"datasets": []},
        "atlas": {"atlases": {"pbmc": {"reference": "pbmc3k", "queries": ["pbmc68k"], "methods": list(METHODS),
                                       "correspondence": {"pbmc68k": CORRESPONDENCE}}},
                  "alpha": alpha},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--no-scale", action="store_true", help="embed.scale false: the PCA (and so the map) "
                        "without per-gene scaling (its own results folder)")
    parser.add_argument("--fresh", action="store_true", help="start from an empty results folder (else only "
                        "what changed reruns, and wall_seconds is that invocation's)")
    args = parser.parse_args()
    if not PBMC3K.exists():
        sys.exit(f"{PBMC3K} is missing: this benchmark needs the shared PBMC 3k data")
    out = HERE / "out" / ("calibration_pbmc3k_noscale" if args.no_scale else "calibration_pbmc3k")
    workdir = out / "workflow"
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    make_workdir(workdir, config(args.alpha, not args.no_scale))
    t = time.perf_counter()
    # the atlas's calibration and mappings always run again (the library may have changed); the
    # reference's chain, classify task and VAE only where the config changed
    r = snakemake(workdir, "--cores", "2", "--forcerun", "atlas_calibrate", "--",
                  "results/atlas/pbmc/pbmc68k/comparison.tsv", timeout=3 * 3600)
    wall = time.perf_counter() - t
    (out / "snakemake.log").write_text(r.stdout + r.stderr)
    result = {"machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                         f"Python {platform.python_version()}",
              "alpha": args.alpha, "embed_scale": not args.no_scale, "wall_seconds": round(wall, 1), "completed": r.returncode == 0}
    if r.returncode != 0:
        result["failure"] = r.stderr[-3000:]
    else:
        atlas = workdir / "results" / "atlas" / "pbmc"
        result["methods"] = {}
        for method in METHODS:
            record = json.loads((atlas / "calibration" / method / "run.json").read_text())
            coverage = pd.read_csv(atlas / "calibration" / method / "coverage.tsv", sep="\t")
            result["methods"][method] = {"heldout": record["metrics"], "model": record["params"].get("best_model", ""),
                                         "coverage_per_label": json.loads(coverage.to_json(orient="records"))}
        table = pd.read_csv(atlas / "pbmc68k" / "comparison.tsv", sep="\t")
        result["query"] = json.loads(table.drop(columns=["run_id"]).to_json(orient="records"))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
