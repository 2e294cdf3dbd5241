"""What every job pays before and beside its work: each step timed in a fresh Python process, as a
Snakemake job runs it (the pipeline's numba cache on, already filled by a first repeat).

    python benchmarks/job_costs.py               # 3 repeats, medians
    python benchmarks/job_costs.py --repeats 5

Steps: the imports every stage makes (MLflow and its SQLite store, scanpy, matplotlib), skops
(each job that saves or loads a scikit-learn model), and placing cells in a reference UMAP with
scanpy's ``Ingest`` two ways: with its own pynndescent index (whose compiled code numba cannot
cache) and with the exact search the atlas stage gives it. Results go to
benchmarks/out/job_costs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "workflow" / "scripts"
CACHE = HERE.parent / ".snakemake" / "numba-cache"
STORE = HERE / "out" / "job_costs" / "mlflow.db"

PRELUDE = f"""
import sys, time
sys.path.insert(0, {str(SCRIPTS)!r})
from cellatlas._numba import enable_cache
enable_cache({str(CACHE)!r})
"""

#: the reference for the placement steps: 5,000 cells in 20 dimensions, six types (above
#: umap-learn's 4,096-cell exact path), its kNN graph and UMAP as the embed stage makes them
PLACE = """
import numpy as np, pandas as pd, anndata as ad
from cellatlas.atlas.methods import place_in_umap
from cellatlas.embed import neighbors, umap
rng = np.random.default_rng(0)
types = rng.integers(0, 6, 5600)
rep = (rng.normal(scale=4, size=(6, 20))[types] + rng.normal(size=(5600, 20))).astype(np.float32)
ref = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5000)]), obsm={"X_pca": rep[:5000]})
neighbors(ref, n_neighbors=15)
umap(ref)
ref.uns["neighbors"]["n_neighbors"] = 15
ref.uns["umap"].update(a=ref.uns["umap"]["params"]["a"], b=ref.uns["umap"]["params"]["b"])
t0 = time.perf_counter()
place_in_umap(ref, "X_pca", rep[5000:], seed=0, exact=EXACT)
print(time.perf_counter() - t0)
"""

STEPS = {
    "import mlflow": "import mlflow",
    # an existing store, as every job but the invocation's first meets it (made by main())
    "import mlflow + open its SQLite store": "from mlflow.tracking import MlflowClient\n"
                                             f"MlflowClient('sqlite:///{STORE}').search_experiments()",
    "import scanpy": "import scanpy",
    "import matplotlib.pyplot": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot",
    "import skops.io": "import skops.io",
}

#: placing 600 cells, after the reference is made (its own time is not counted)
PLACEMENT = {"place 600 cells, Ingest's pynndescent index": False,
             "place 600 cells, exact search (the atlas stage)": True}


def run(code: str, *, with_prelude: bool = False) -> float:
    """Seconds the code takes in a fresh process (the process's own clock, after the prelude, or
    from before it)."""
    start = "import time\nt0 = time.perf_counter()\n"
    timed = (start + PRELUDE if with_prelude else PRELUDE + start) + code + "\nprint(time.perf_counter() - t0)\n"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", timed], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def run_placement(exact: bool) -> float:
    code = PRELUDE + f"EXACT = {exact}\n" + PLACE
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    STORE.parent.mkdir(parents=True, exist_ok=True)
    run(STEPS["import mlflow + open its SQLite store"])  # creates the store, as an invocation's first job does
    run(STEPS["import scanpy"])  # fills the numba cache, as a first job would
    results = {"numba and the pipeline's cache hook (every job, before the rest)":
               [run("", with_prelude=True) for _ in range(args.repeats)]}
    for name, code in STEPS.items():
        results[name] = [run(code) for _ in range(args.repeats)]
    for name, exact in PLACEMENT.items():
        run_placement(exact)  # fills the cache of what can be cached (umap-learn's layout code)
        results[name] = [run_placement(exact) for _ in range(args.repeats)]
    for name, seconds in results.items():
        print(f"{name:50s} median {statistics.median(seconds):6.2f} s   ({', '.join(f'{s:.2f}' for s in seconds)})")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "job_costs.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
