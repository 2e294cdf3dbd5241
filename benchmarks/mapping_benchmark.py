"""Atlas mapping at scale: a simulated query of 100,000 cells mapped onto a reference by every
method, each job's wall time and peak memory, and the labels' accuracy.

    python benchmarks/mapping_benchmark.py                               # reference 300,000, query 100,000
    python benchmarks/mapping_benchmark.py --reference 15000 --query 5000   # a quick check

One simulation (`cellatlas.simulate.write_simulated`, 20,000 genes, the scale benchmark's depth:
about 1,180 detected genes per cell) of reference + query cells, one donor per 10,000 cells,
donors nested in batches. The query is the last batch (new donors, sequenced apart: what a lab
maps onto a published atlas); the reference is every other batch without one cell type, so each
method's share of that type left unassigned is measured beside its accuracy on the others.

The real workflow with `--cores 2`: the reference through ingest -> qc -> normalize -> embed ->
cluster, its classify task (one model, grouped 5-fold CV) and VAE (`--epochs`), the reference
map; the query through normalize (what mapping reads), the three mapping jobs and their
comparison; stage files are deleted once read (`keep_intermediate: false`) unless `--keep`.
The query's ingest reads the whole simulated source (reference cells too) before its subset. Per job, Snakemake's `benchmark:` seconds and peak RSS; per method,
the comparison's scores. Writes benchmarks/out/mapping_<reference>_<query>/result.json.
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
sys.path.insert(0, str(HERE))

from scale_benchmark import CELLS_PER_DONOR, N_GENES, job_figures, prepare  # noqa: E402
from workflow_utils import make_workdir, snakemake  # noqa: E402

METHODS = ("projection", "latent", "classifier")
NOVEL = "type_2"


def simulation(reference: int, query: int) -> dict:
    n_cells = reference + query
    if reference % query:
        sys.exit("--reference must be a multiple of --query (the query is one batch of equal-sized batches)")
    n_batches = n_cells // query
    return {"n_cells": n_cells, "n_genes": N_GENES, "n_types": 12, "n_batches": n_batches,
            # a multiple of the batches (donor d is in batch d % n_batches): batches of equal size
            "n_donors": n_batches * max(4, -(-query // CELLS_PER_DONOR)), "library_size": 1500.0,
            "doublet_rate": 0.03, "seed": 0}


def config(h5ad: Path, query_batch: str, model: str, epochs: int, keep: bool) -> dict:
    source = {"kind": "h5ad", "path": str(h5ad)}
    keys = {"label_key": "cell_type", "batch_key": "batch", "donor_key": "donor"}
    return {
        "datasets": {
            "ref": {"source": source, "subset": {"drop": {"batch": [query_batch], "label": [NOVEL]}}, **keys},
            "query": {"source": source, "subset": {"keep": {"batch": [query_batch]}}, **keys},
        },
        "classify": {"tasks": {"ref": {"cell_type": {"target": "label", "models": [model]}}}},
        "train": {"embedding": {"datasets": ["ref"], "max_epochs": epochs}},
        "integration": {"datasets": []},
        "atlas": {"atlases": {"a": {"reference": "ref", "queries": ["query"], "methods": list(METHODS)}}},
        "keep_intermediate": keep,
    }


def all_job_figures(workdir: Path) -> dict:
    """Every job's Snakemake benchmark: {relative path without .tsv: {seconds, max_rss_mb}}."""
    results = workdir / "results"
    return {str(tsv.relative_to(results)).removesuffix(".tsv").replace("benchmarks/", ""): job_figures(tsv)
            for tsv in sorted(results.rglob("benchmarks/**/*.tsv"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=int, default=300_000, help="reference cells before the held-out type")
    parser.add_argument("--query", type=int, default=100_000)
    parser.add_argument("--model", default="logistic_regression", help="the reference's classify model")
    parser.add_argument("--epochs", type=int, default=20, help="the reference VAE's max_epochs")
    parser.add_argument("--keep", action="store_true", help="keep every stage file (several copies of the matrix)")
    args = parser.parse_args()
    sim = simulation(args.reference, args.query)
    out = HERE / "out" / f"mapping_{args.reference}_{args.query}"
    out.mkdir(parents=True, exist_ok=True)
    h5ad, simulate_seconds = prepare(sim, out)
    workdir = out / "workflow"
    shutil.rmtree(workdir, ignore_errors=True)
    make_workdir(workdir, config(h5ad, f"batch_{sim['n_batches'] - 1}", args.model, args.epochs, args.keep))
    target = "results/atlas/a/query/comparison.tsv"
    t = time.perf_counter()
    r = snakemake(workdir, "--cores", "2", "--", target, timeout=8 * 3600)
    wall = time.perf_counter() - t
    (out / "snakemake.log").write_text(r.stdout + r.stderr)
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "simulation": sim, "simulate_seconds": round(simulate_seconds, 1), "model": args.model,
        "vae_max_epochs": args.epochs, "wall_seconds": round(wall, 1), "completed": r.returncode == 0,
        "jobs": all_job_figures(workdir),
    }
    if r.returncode != 0:
        result["failure"] = r.stderr[-3000:]
    else:
        table = pd.read_csv(workdir / "results" / "atlas" / "a" / "query" / "comparison.tsv", sep="\t")
        result["methods"] = json.loads(table.drop(columns=["run_id"]).to_json(orient="records"))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        for path in (workdir / "results").rglob("*.h5ad"):
            path.unlink()
        shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
