"""The baseline: the same steps as a plain single-process scanpy script, timed per step.

Usage: python plain_scanpy.py INPUT.h5ad OUTPUT.json
Every step's wall time and the process's peak RSS after it are recorded; import time counts.
"""

import json
import resource
import sys
import time

T0 = time.perf_counter()
timings: list[dict] = []


def step(name: str, t: float) -> float:
    now = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    timings.append({"step": name, "seconds": round(now - t, 2), "peak_rss_mb": round(peak, 1)})
    print(f"{name:12s} {now - t:8.2f} s  peak {peak:8.0f} MiB", flush=True)
    return now


t = time.perf_counter()
import anndata as ad  # noqa: E402
import scanpy as sc  # noqa: E402

t = step("import", T0)
adata = ad.read_h5ad(sys.argv[1])
t = step("read", t)
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
t = step("normalize", t)
sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
t = step("hvg", t)
sc.pp.pca(adata, n_comps=40, mask_var="highly_variable", random_state=0)
t = step("pca", t)
sc.pp.neighbors(adata, n_neighbors=10, random_state=0)
t = step("neighbors", t)
sc.tl.umap(adata, random_state=0)
t = step("umap", t)
sc.tl.tsne(adata, random_state=0)  # scanpy's default: scikit-learn's Barnes-Hut
t = step("tsne", t)
sc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=0)
t = step("leiden", t)
total = time.perf_counter() - T0
json.dump({"steps": timings, "total_seconds": round(total, 2)}, open(sys.argv[2], "w"), indent=2)
print(f"{'total':12s} {total:8.2f} s")
