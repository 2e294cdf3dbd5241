"""Wall time and peak memory: our pipeline against a plain scanpy script, on the same input.

    python benchmarks/run_benchmark.py pbmc3k   # ../shared/data PBMC 3k (2,638 cells)
    python benchmarks/run_benchmark.py sim50k   # simulated 50,000 cells x 15,000 genes

Writes benchmarks/out/<name>/result.json and prints a table. The pipeline runs with
`--cores 2`; the fixed cost per stage is
measured as each stage's wall time on a 100-cell subset. Numba's cache is first filled by one
run on 5,000 of the cells (its cost is reported as the first-run cost); the comparison then runs
with that cache, as every run after a user's first does.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))

from workflow_utils import make_workdir, snakemake  # noqa: E402

STAGES = ("ingest", "qc", "normalize", "embed", "cluster")
SHARED = HERE.parent.parent / "shared" / "data" / "pbmc3k" / "pbmc3k_counts_labelled.h5ad"


def chain_config(entry: dict, dataset: str) -> dict:
    """The chain to clusters only: the supervised models, integration methods and the VAE have
    benchmarks of their own (classify_benchmark.py, integration_benchmark.py, train_benchmark.py)."""
    return {"datasets": {dataset: entry}, "classify": {"tasks": {}}, "integration": {"datasets": []},
            "train": {"embedding": {"datasets": []}}}


def prepare(name: str, out: Path) -> Path:
    if name == "pbmc3k":
        if not SHARED.exists():
            sys.exit(f"{SHARED} is not present")
        return SHARED
    path = out / "input.h5ad"
    if not path.exists():
        # in a child process: the baseline is forked from this one, and Linux carries a parent's
        # peak RSS over into the child's getrusage, which would inflate the baseline's peak
        code = (
            "import sys; from cellatlas.simulate import simulate_counts; "
            "simulate_counts(n_cells=50_000, n_genes=15_000, n_types=10, n_donors=8, n_batches=2, seed=0)"
            ".write_h5ad(sys.argv[1])"
        )
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "workflow" / "scripts")}
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    return path


def pipeline(workdir: Path, h5ad: Path, dataset: str, annotated: bool) -> tuple[float, dict]:
    entry = {"source": {"kind": "h5ad", "path": str(h5ad)}}
    if annotated:  # the simulated data carry their annotation, as a user's atlas would
        entry.update(label_key="cell_type", batch_key="batch", donor_key="donor")
    make_workdir(workdir, chain_config(entry, dataset))
    t = time.perf_counter()
    r = snakemake(workdir, "--cores", "2", "--", f"results/{dataset}/cluster/run.json")
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    stages = {}
    for stage in STAGES:
        with open(workdir / "results" / dataset / "benchmarks" / f"{stage}.tsv") as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        stages[stage] = {"seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    return wall, stages


def main(name: str) -> None:
    out = HERE / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    h5ad = prepare(name, out)

    if (out / "plain.json").exists() and "--rerun-plain" not in sys.argv:
        print(f"reusing {out / 'plain.json'} (--rerun-plain to measure again)")
    else:
        subprocess.run([sys.executable, str(HERE / "plain_scanpy.py"), str(h5ad), str(out / "plain.json")], check=True)
    plain = json.loads((out / "plain.json").read_text())

    import anndata as ad

    tiny_path = out / "tiny.h5ad"
    ad.read_h5ad(h5ad)[:100].copy().write_h5ad(tiny_path)
    warm_path = out / "warmup.h5ad"
    ad.read_h5ad(h5ad)[:5000].copy().write_h5ad(warm_path)
    cache = out / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["NUMBA_CACHE_DIR"] = str(cache)
    # a first run with an empty cache on 5,000 cells (above the 4,096 at which pynndescent,
    # and its JIT, come in): what a user's very first run pays once
    shutil.rmtree(out / "warmup", ignore_errors=True)
    cold_wall, cold = pipeline(out / "warmup", warm_path, "warmup", name != "pbmc3k")
    # then the real comparison and the fixed cost, both with the cache that first run filled
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    wall, stages = pipeline(out / "pipeline", h5ad, name, name != "pbmc3k")
    shutil.rmtree(out / "tiny", ignore_errors=True)
    tiny_wall, tiny = pipeline(out / "tiny", tiny_path, "tiny", name != "pbmc3k")

    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "input": str(h5ad),
        "plain": plain,
        "pipeline": {"wall_seconds": round(wall, 2), "stages": stages},
        "fixed_cost_100_cells": {"wall_seconds": round(tiny_wall, 2), "stages": tiny},
        "first_run_5000_cells_cold_cache": {"wall_seconds": round(cold_wall, 2), "stages": cold},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"first run ever (5,000 cells, empty numba cache): {cold_wall:.1f} s")
    print(f"\n{name}: plain scanpy {plain['total_seconds']:.1f} s (peak {max(s['peak_rss_mb'] for s in plain['steps']):.0f} MiB); "
          f"pipeline {wall:.1f} s wall, ratio {wall / plain['total_seconds']:.2f}")
    for stage in STAGES:
        print(f"  {stage:10s} {stages[stage]['seconds']:7.1f} s  {stages[stage]['max_rss_mb']:7.0f} MiB   "
              f"fixed cost {tiny[stage]['seconds']:5.1f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pbmc3k")
