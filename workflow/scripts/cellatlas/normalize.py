"""Normalization and highly variable genes.

Counts stay in ``layers["counts"]``; ``X`` becomes log1p of total-count-normalized values.
Input that arrived already log-normalized is left as it is (normalizing twice is a silent
error), and the record says so.
"""

from __future__ import annotations

import gc
import logging

from cellatlas import keys
from cellatlas.errors import InputDataError

log = logging.getLogger(__name__)


def normalize(
    adata,
    dataset: str,
    *,
    target_sum: float | None = 1e4,
    n_top_genes: int = 2000,
    batch_aware: bool = True,
    keep_counts: bool = True,
):
    """Normalize and select highly variable genes, in place.

    Returns
    -------
    Summary dict. ``adata`` gains ``layers["counts"]`` (counts input only, and only with
    ``keep_counts``: the stage copies them into its output from the input file), log-normalized ``X``,
    ``var["highly_variable"]`` (and ``highly_variable_nbatches`` when batch-aware) and
    ``uns["cellatlas"]["normalize"]`` with params and summary.
    """
    import anndata as ad
    import scanpy as sc

    counts = adata.uns[keys.UNS_KEY]["ingest"]["values"] == keys.VALUES_COUNTS
    if counts:
        if keep_counts:
            adata.layers[keys.COUNTS_LAYER] = adata.X.copy()
        normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
        method = f"total-count to {target_sum:g} + log1p" if target_sum else "total-count to median + log1p"
    else:
        method = "none: input already log-normalized"
    n_top = min(n_top_genes, adata.n_vars)
    batch_key = keys.BATCH if batch_aware and keys.BATCH in adata.obs else None
    if batch_key is not None and adata.obs[batch_key].nunique() < 2:
        batch_key = None
    if not _any_gene_varies(adata.X):
        raise InputDataError(dataset, f"no gene varies across its {adata.n_obs} cells ({adata.n_vars} genes): there is "
                                      "nothing to select or embed; check the source and the QC thresholds")
    # seurat flavor works on log data; seurat_v3 would need counts and an extra package.
    # on an AnnData of X alone: scanpy copies each batch's whole AnnData, the counts layer included
    # (measured at 100,000 cells: 0.9 GiB more at the peak)
    genes = ad.AnnData(X=adata.X, obs=adata.obs[[batch_key]] if batch_key else None, var=adata.var[[]],
                       uns={k: adata.uns[k] for k in ("log1p",) if k in adata.uns})
    try:
        sc.pp.highly_variable_genes(genes, n_top_genes=n_top, flavor="seurat", batch_key=batch_key)
    except (IndexError, ValueError) as e:  # too few distinct values for scanpy's dispersion bins
        raise InputDataError(dataset, f"highly variable genes cannot be selected ({' '.join(str(e).split())[:150]}); "
                                      "too few genes vary") from e
    for column in genes.var.columns:
        adata.var[column] = genes.var[column]
    adata.uns["hvg"] = genes.uns["hvg"]
    del genes
    # scanpy's per-batch HVG copies sit in reference cycles: freed now, not when Python's collector
    # next runs (measured at 100,000 cells: one more copy of the matrix held into the write)
    gc.collect()
    n_hvg = int(adata.var["highly_variable"].sum())
    if n_hvg == 0:
        raise InputDataError(dataset, "no highly variable genes found")
    summary = {"normalization": method, "n_hvg": n_hvg, "hvg_batch_key": batch_key or ""}
    adata.uns[keys.UNS_KEY]["normalize"] = {
        "params": {"target_sum": target_sum if target_sum else 0.0, "n_top_genes": n_top_genes, "batch_aware": batch_aware},
        "summary": summary,
    }
    return summary


def normalize_total(adata, *, target_sum: float | None, block: int = 10_000) -> None:
    """scanpy's ``normalize_total`` of a CSR ``X`` in place, ``block`` cells at a time: the same
    numbers (each cell is scaled on its own once the target is known), without the temporary copy
    of the whole matrix that scanpy's division makes (100,000 cells: 0.9 GiB at the peak)."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    X = adata.X
    if not sp.issparse(X) or X.format != "csr" or X.dtype != np.float32:
        sc.pp.normalize_total(adata, target_sum=target_sum)
        return
    if target_sum is None:  # scanpy's choice: the median of the cells' totals, summed in float64
        totals = np.concatenate([np.asarray(X[i:i + block].sum(axis=1, dtype=np.float64)).ravel()
                                 for i in range(0, X.shape[0], block)]).astype(np.float32)
        target_sum = float(np.median(totals))
    for i in range(0, X.shape[0], block):
        lo, hi = X.indptr[i], X.indptr[min(i + block, X.shape[0])]
        part = ad.AnnData(X=sp.csr_matrix((X.data[lo:hi], X.indices[lo:hi], X.indptr[i:i + block + 1] - lo),
                                          shape=(min(block, X.shape[0] - i), X.shape[1])))
        sc.pp.normalize_total(part, target_sum=target_sum)
        X.data[lo:hi] = part.X.data


#: nonzeros per slice where a whole-matrix temporary would be a copy of the matrix
CHUNK = 50_000_000


def _any_gene_varies(X) -> bool:
    import numpy as np
    import scipy.sparse as sp

    if X.shape[0] < 2:
        return False
    if sp.issparse(X):
        # a gene with zeros and nonzeros varies: the answer almost always, without the CSC copy
        # of the whole matrix that scipy's column min/max makes
        X = sp.csr_matrix(X)  # no copy of a CSR matrix
        # in slices: np.bincount casts int32 indices to int64, a copy of the whole array at once
        # (9.6 GB at a million cells: normalize's peak there)
        slices = [slice(lo, lo + CHUNK) for lo in range(0, X.nnz, CHUNK)]
        stored = np.zeros(X.shape[1], dtype=np.int64)
        for s in slices:
            stored += np.bincount(X.indices[s], minlength=X.shape[1])
        partly = np.flatnonzero((stored > 0) & (stored < X.shape[0]))
        if partly.size:
            gene = partly[np.argmax(stored[partly])]
            if any(np.any(X.data[s][X.indices[s] == gene] != 0) for s in slices):
                return True
    lo, hi = X.min(axis=0), X.max(axis=0)
    if sp.issparse(lo):
        lo, hi = lo.toarray(), hi.toarray()
    return bool(np.any(np.asarray(hi) != np.asarray(lo)))


def hvg_table(adata):
    """Per-gene dispersion table for the HVG figure and the artifact."""
    cols = [c for c in ("means", "dispersions", "dispersions_norm", "highly_variable", "highly_variable_nbatches") if c in adata.var]
    table = adata.var[cols].copy()
    table.index.name = "gene"
    return table.sort_values("dispersions_norm", ascending=False, na_position="last")


