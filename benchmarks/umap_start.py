"""UMAP's start: umap-learn's spectral layout (scanpy's default) against the first two principal
components of the graph's representation, on the same kNN graph and seed.

    python benchmarks/umap_start.py                 # PBMC 3k (when ../shared/data has it) and simulated sets
    python benchmarks/umap_start.py --cells 50000 200000

For each start: UMAP's seconds; how many of each cell's kNN-graph neighbours stay among its
nearest cells in the map (local structure); the Spearman correlation between the distances of the
labels' centroids in the PCA and in the map (global structure, Kobak & Linderman 2021); and the
labels' silhouette in the map (on 5,000 cells). Results go to benchmarks/out/umap_start.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))
PBMC = HERE.parent.parent / "shared" / "data" / "pbmc3k" / "pbmc3k_counts_labelled.h5ad"


def prepared(adata, label: str):
    """scanpy's normalize_total, log1p and seurat-flavour HVGs (not per batch), then the pipeline's
    own PCA and kNN graph at the default config's sizes."""
    import scanpy as sc

    from cellatlas.embed import neighbors, pca

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
    pca(adata, n_pcs=40)
    neighbors(adata, n_neighbors=10)
    adata.obs["label"] = adata.obs[label].astype(str).to_numpy()
    return adata


def scores(adata, emb: np.ndarray) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    graph = adata.obsp["distances"].tocsr()
    k = int(np.diff(graph.indptr).max())
    _, near = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    kept = [len(set(graph.indices[graph.indptr[i]:graph.indptr[i + 1]]) & set(near[i, 1:])) / max(1, graph.indptr[i + 1] - graph.indptr[i])
            for i in range(adata.n_obs)]
    labels = adata.obs["label"].to_numpy()
    types = np.unique(labels)
    cen_pca = np.array([adata.obsm["X_pca"][labels == t].mean(0) for t in types])
    cen_map = np.array([emb[labels == t].mean(0) for t in types])
    iu = np.triu_indices(len(types), 1)
    d_pca = np.linalg.norm(cen_pca[:, None] - cen_pca[None], axis=-1)[iu]
    d_map = np.linalg.norm(cen_map[:, None] - cen_map[None], axis=-1)[iu]
    return {"knn_kept": float(np.mean(kept)), "centroid_spearman": float(spearmanr(d_pca, d_map).statistic),
            "silhouette": float(silhouette_score(emb, labels, sample_size=min(5000, len(labels)), random_state=0))}


def compare(adata) -> dict:
    import scanpy as sc

    from cellatlas.embed import umap_start

    out = {"n_cells": int(adata.n_obs)}
    # umap-learn's layout code compiles on the first call in a process: pay it before timing
    sc.tl.umap(adata[:500].copy(), min_dist=0.5, random_state=0, maxiter=5)
    for start in ("spectral", "pca"):
        t = time.perf_counter()
        init = "spectral" if start == "spectral" else umap_start(adata)
        sc.tl.umap(adata, min_dist=0.5, random_state=0, init_pos=init)
        out[start] = {"seconds": round(time.perf_counter() - t, 1), **scores(adata, adata.obsm["X_umap"])}
        print(f"{adata.n_obs:,} cells, {start}: {out[start]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="*", type=int, default=[50_000, 200_000])
    args = parser.parse_args()
    import anndata as ad

    from cellatlas.simulate import simulate_counts

    out = HERE / "out" / "umap_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    datasets = [("pbmc3k", None)] if PBMC.exists() else []
    for name, n in datasets + [(f"simulated_{n}", n) for n in args.cells]:
        if n is None:
            adata = prepared(ad.read_h5ad(PBMC), "celltype_seurat")
        else:
            # the scale benchmark's simulation (one donor per 10,000 cells, 12 types, 3 % doublets)
            # on 5,000 genes: UMAP sees only the graph
            adata = prepared(simulate_counts(n_cells=n, n_genes=5000, n_types=12, n_donors=max(2, n // 10_000),
                                             n_batches=4, library_size=1500.0, doublet_rate=0.03, seed=0), "cell_type")
        results[name] = compare(adata)
        out.write_text(json.dumps(results, indent=2))  # each as it finishes: a large spectral start may not


if __name__ == "__main__":
    main()
