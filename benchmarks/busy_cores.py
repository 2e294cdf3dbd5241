"""A job's threads when the cores are busy: the same work alone and beside busy processes, with
OpenMP's default wait (threads spin for work) and with ``OMP_WAIT_POLICY=PASSIVE`` (they sleep),
which the runner sets in every job.

    python benchmarks/busy_cores.py                 # 0 and 2 busy processes, medians of 3
    python benchmarks/busy_cores.py --busy 0 1 2 --repeats 1

Work, each in a fresh process with two threads (the threads of the pipeline's training jobs on
this machine): the VAE of train_vae (torch), 8 epochs on 5,000 simulated cells x 1,500 genes; a
histogram gradient boosting fit (scikit-learn's OpenMP); UMAP on a 5,000-cell kNN graph (numba).
The busy processes are Python loops, one core each, standing for the other jobs and tests that
share the cores. Seconds and CPU seconds are the work's own (imports and data aside); the two
policies take turns going first. At each busy level the VAE's latent spaces of the two policies'
last runs are compared bit for bit. Results go to
benchmarks/out/busy_cores.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
from pathlib import Path

# each step's process starts as job_costs.py's do: the pipeline's library on the path, numba's cache on
from job_costs import PRELUDE

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "busy_cores"

WORK = {
    "vae": """
import numpy as np, torch
from cellatlas.simulate import simulate_counts
from cellatlas.deep.embedding import LATENT, train_vae
torch.set_num_threads(2)
a = simulate_counts(n_cells=5000, n_genes=1500, n_types=5, n_donors=4, n_batches=2, seed=7)
a.layers["counts"] = a.X.copy()
a.obs["batch"] = a.obs["batch"].astype(str)
t0, c0 = time.perf_counter(), time.process_time()
train_vae(a, dataset="bench", model={"n_latent": 8, "max_epochs": 8},
          trainer={"accelerator": "cpu"}, seed=0)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
np.save(OUT_FILE, a.obsm[LATENT])
""",
    "hist_gradient_boosting": """
import numpy as np
from threadpoolctl import threadpool_limits
from sklearn.ensemble import HistGradientBoostingClassifier
rng = np.random.default_rng(0)
X = rng.normal(size=(20000, 50)); y = (X[:, 0] + rng.normal(size=20000) > 0).astype(int)
with threadpool_limits(2):
    t0, c0 = time.perf_counter(), time.process_time()
    HistGradientBoostingClassifier(max_iter=100, random_state=0, early_stopping=False).fit(X, y)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
""",
    "umap": """
import numpy as np, anndata as ad, pandas as pd
from cellatlas.embed import neighbors, umap
rng = np.random.default_rng(0)
types = rng.integers(0, 6, 5000)
rep = (rng.normal(scale=4, size=(6, 20))[types] + rng.normal(size=(5000, 20))).astype(np.float32)
a = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5000)]), obsm={"X_pca": rep})
neighbors(a, n_neighbors=15)
t0, c0 = time.perf_counter(), time.process_time()
umap(a)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
""",
}

def _spin(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def run(work: str, policy: str | None, busy: int, out_file: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["NUMBA_NUM_THREADS"] = "2"
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = PRELUDE + f"OUT_FILE = {str(out_file)!r}\n" + WORK[work] + "\nprint(seconds, cpu)\n"
    hogs = [mp.Process(target=_spin, args=(3600,), daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    finally:
        for h in hogs:
            h.terminate()
            h.join()
    seconds, cpu = r.stdout.split()[-2:]
    return {"seconds": float(seconds), "cpu_seconds": float(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", nargs="+", choices=sorted(WORK), default=sorted(WORK))
    args = parser.parse_args()
    import numpy as np

    OUT.mkdir(parents=True, exist_ok=True)
    for work in args.work:  # an untimed first run fills numba's cache
        run(work, "PASSIVE", 0, OUT / "warm.npy")
    results, same = [], {}
    for work in args.work:
        for busy in args.busy:
            runs = {None: [], "PASSIVE": []}
            for k in range(args.repeats):  # the two policies take turns going first
                for policy in ((None, "PASSIVE") if k % 2 == 0 else ("PASSIVE", None)):
                    runs[policy].append(run(work, policy, busy, OUT / f"{work}-{policy}.npy"))
            for policy, done in runs.items():
                row = {"work": work, "busy_processes": busy, "policy": policy or "default (spin)",
                       "seconds": statistics.median(r["seconds"] for r in done),
                       "cpu_seconds": statistics.median(r["cpu_seconds"] for r in done),
                       "runs": done}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
            if work == "vae":  # the last run of each policy at this level
                same[str(busy)] = bool(np.array_equal(np.load(OUT / "vae-None.npy"), np.load(OUT / "vae-PASSIVE.npy")))
                print(f"vae latent space identical under both policies, {busy} busy: {same[str(busy)]}")
    (HERE / "out" / "busy_cores.json").write_text(json.dumps({"results": results, "vae_identical": same}, indent=2))


if __name__ == "__main__":
    main()
