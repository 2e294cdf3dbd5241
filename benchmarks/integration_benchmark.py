"""Integration methods at scale: each method's time and peak memory, and its scIB scoring's.

    python benchmarks/integration_benchmark.py                  # 50,000 cells x 2,000 genes
    python benchmarks/integration_benchmark.py --cells 10000 --methods pca harmony

A simulated dataset (10 types, 8 donors in 2 batches; the simulator's default batch effect) is
normalized and embedded as the pipeline does (2,000 HVGs, 40 PCs, scaled) once, in this process.
Then every method runs in a process of its own (so peak memory is its own: ru_maxrss of that
child): ``integrate`` (the method), then ``score`` (scIB's metrics through scib-metrics, and the
batch mixing), then for pca and vae the held-out fit. The VAE is trained here with the
default ``train.embedding`` settings (its integrate job reads train_vae's codes; this measures
both). Writes benchmarks/out/integration_<cells>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))

METHODS = ("pca", "combat", "harmony", "bbknn", "vae")
EMBED = {"n_pcs": 40, "scale": True, "n_neighbors": 10}
#: the VAEs train this many epochs here (the default config's early stopping decides in a run):
#: the figure is per fit of that length, and seconds per epoch follow
VAE_EPOCHS = 20


def prepare(cells: int, genes: int, path: Path) -> dict:
    from cellatlas.embed import pca
    from cellatlas.ingest import canonicalize
    from cellatlas.normalize import normalize
    from cellatlas.simulate import simulate_counts

    t = time.perf_counter()
    a = simulate_counts(n_cells=cells, n_genes=genes, n_types=10, n_donors=8, n_batches=2, seed=0)
    a = canonicalize(a, "bench", label_key="cell_type", batch_key="batch", donor_key="donor")
    normalize(a, "bench", target_sum=1e4, n_top_genes=2000, batch_aware=True)
    pca(a, n_pcs=EMBED["n_pcs"], scale=EMBED["scale"], seed=0)
    a.write_h5ad(path)
    return {"prepare_seconds": time.perf_counter() - t, "n_cells": a.n_obs, "n_genes": a.n_vars}


def child(method: str, path: str) -> dict:
    """One method in this process: integrate, score, held out (pca, vae)."""
    import anndata as ad
    import torch

    from cellatlas._numba import enable_cache
    from cellatlas.integrate import MAPS_NEW_CELLS
    from cellatlas.integrate.methods import heldout_donor, integrate, integrate_heldout
    from cellatlas.integrate.stages import _scores

    enable_cache(str(HERE / "out" / "numba-cache"))
    torch.set_num_threads(os.cpu_count() or 1)
    a = ad.read_h5ad(path)
    out = {"method": method}
    latent = None
    vae = {"model": {"max_epochs": VAE_EPOCHS, "patience": VAE_EPOCHS}, "trainer": {"accelerator": "cpu"}}
    if method == "vae":
        from cellatlas.deep.embedding import LATENT, train_vae

        t = time.perf_counter()
        fit = a.copy()
        train_vae(fit, dataset="bench", model=vae["model"], trainer=vae["trainer"], seed=0)
        latent = fit.obsm[LATENT]
        out["train_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    it = integrate(a, method, {}, embed=EMBED, seed=0, latent=latent)
    out["integrate_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    row = _scores(it, a, seed=0, n_neighbors=EMBED["n_neighbors"])
    out["score_seconds"] = time.perf_counter() - t
    out.update({k: row[k] for k in ("batch_correction", "bio_conservation", "total", "batch_mixing", "ilisi", "ari")})
    if method in MAPS_NEW_CELLS:
        t = time.perf_counter()
        if method == "vae":
            from cellatlas.integrate.vae import vae_heldout

            vae_heldout(a, heldout_donor(a), vae=vae, seed=0)
        else:
            integrate_heldout(a, method, heldout_donor(a), embed=EMBED, seed=0)
        out["heldout_fit_seconds"] = time.perf_counter() - t
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "H5AD"), help=argparse.SUPPRESS)
    ap.add_argument("--keep", help="write the prepared dataset here (and reuse it when it exists)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    (HERE / "out").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "bench.h5ad"
        prepared = {"prepared": str(path)} if path.exists() else prepare(args.cells, args.genes, path)
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  **prepared, "methods": []}
        print(json.dumps({k: v for k, v in result.items() if k != "methods"}), flush=True)
        for method in args.methods:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", method, str(path)], capture_output=True,
                                  text=True)
            if proc.returncode:
                row = {"method": method, "error": proc.stderr.strip().splitlines()[-1]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_seconds"] = time.perf_counter() - t
            result["methods"].append(row)
            print(json.dumps(row), flush=True)
    (HERE / "out" / f"integration_{args.cells}_{'_'.join(args.methods)}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
