"""Embeddings: PCA on the highly variable genes, kNN graph, UMAP, t-SNE (openTSNE).

PCA never densifies the gene matrix. Unit-variance scaling, which the usual recipe does with
a dense ``sc.pp.scale``, is done here by dividing the sparse HVG columns by their standard
deviation (sparsity is kept) and letting the covariance PCA centre implicitly; the result is
the PCA of z-scored genes, without the clipping at 10 that the dense recipe adds.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from cellatlas import keys

log = logging.getLogger(__name__)


def gene_mean_sd(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and population sd of a sparse matrix (sd 1 for a constant gene): the
    scaling PCA uses, and the one an atlas applies to a query projected onto it."""
    X = sp.csr_matrix(X, dtype=np.float64)
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(sq - mean**2, 0.0))
    sd[sd == 0] = 1.0
    return mean, sd


def pca(adata, *, n_pcs: int = 40, scale: bool = True, seed: int = 0, matrix=None) -> dict:
    """PCA of the HVG submatrix (``matrix``, when the caller read those columns of X apart).

    Returns
    -------
    Summary dict. ``adata`` gains ``obsm["X_pca"]``, ``varm["PCs"]`` (zeros outside the HVGs),
    ``uns["pca"]["variance_ratio"|"variance"]``.
    """
    import scanpy as sc

    hvg = adata.var["highly_variable"].to_numpy(dtype=bool)
    X = adata.X[:, hvg] if matrix is None else matrix
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    X = X.astype(np.float64)
    if scale:
        _, sd = gene_mean_sd(X)
        X = X @ sp.diags(1.0 / sd)
    n_comps = int(min(n_pcs, X.shape[0] - 1, X.shape[1] - 1))
    import anndata as ad

    tmp = ad.AnnData(X=sp.csr_matrix(X))
    sc.pp.pca(tmp, n_comps=n_comps, zero_center=True, svd_solver="covariance_eigh", random_state=seed)
    # PC signs are arbitrary; fix them so reruns and platforms agree on orientation.
    loadings = tmp.varm["PCs"]
    flip = np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(n_comps)])
    adata.obsm["X_pca"] = (tmp.obsm["X_pca"] * flip).astype(np.float32)
    pcs = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    pcs[hvg] = loadings * flip
    adata.varm["PCs"] = pcs
    ratio = np.asarray(tmp.uns["pca"]["variance_ratio"])
    adata.uns["pca"] = {
        "variance_ratio": ratio,
        "variance": np.asarray(tmp.uns["pca"]["variance"]),
        "params": {"n_comps": n_comps, "scale": scale, "genes": "highly_variable"},
    }
    return {"n_pcs": n_comps, "pca_variance_explained": float(ratio.sum()), "pc1_variance_ratio": float(ratio[0])}


def neighbors(adata, *, n_neighbors: int = 10, n_pcs: int | None = None, seed: int = 0) -> None:
    """kNN graph on ``X_pca`` (``obsp["distances"|"connectivities"]``)."""
    import scanpy as sc

    n_pcs = n_pcs or adata.obsm["X_pca"].shape[1]
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, n_pcs=min(n_pcs, adata.obsm["X_pca"].shape[1]), use_rep="X_pca", random_state=seed)


def umap_start(adata) -> np.ndarray | str:
    """The first two principal components of the representation the kNN graph was built on
    (``uns["neighbors"]["params"]["use_rep"]``, ``X_pca`` by default): UMAP's start.

    umap-learn's own start, a spectral layout, solves an eigenproblem with ARPACK for each
    connected component of the graph; its time grows faster than the cells (a million cells were
    still in it after 54 minutes). t-SNE here already starts from the PCA (Kobak & Linderman 2021
    recommend it for both maps); benchmarks/umap_start.py finds the same local structure from
    either start. scikit-learn's PCA fixes the signs by the loadings, so reruns agree.
    """
    from sklearn.decomposition import PCA

    rep = adata.uns.get("neighbors", {}).get("params", {}).get("use_rep") or "X_pca"
    X = np.asarray(adata.obsm[rep], dtype=np.float64)
    if X.shape[1] < 2:  # a one-component PCA (a handful of cells): nothing to start from
        return "spectral"
    return PCA(n_components=2, svd_solver="covariance_eigh").fit_transform(X).astype(np.float32)


def umap(adata, *, min_dist: float = 0.5, seed: int = 0, start: str | None = None) -> None:
    """UMAP of the kNN graph (``obsm["X_umap"]``), started from :func:`umap_start`, or from
    umap-learn's ``start`` (``"spectral"``) where the graph's representation is not the space the
    graph describes."""
    import scanpy as sc

    start = start or umap_start(adata)
    sc.tl.umap(adata, min_dist=min_dist, random_state=seed, init_pos=start)
    adata.uns["umap"]["params"]["init_pos"] = start if isinstance(start, str) else "pca"  # provenance


def tsne(adata, *, perplexity: float = 30.0, n_pcs: int | None = None, seed: int = 0, n_jobs: int = 1,
         rep: str = "X_pca") -> None:
    """t-SNE with openTSNE on ``obsm[rep]`` (``obsm["X_tsne"]``), FFT-accelerated for large data.

    openTSNE's interpolation scales as O(n), against the O(n log n) Barnes-Hut t-SNE that
    scanpy's default calls through scikit-learn; it is several times faster from ~10^4 cells.
    """
    from openTSNE import TSNE

    X = adata.obsm[rep]
    if n_pcs:
        X = X[:, :n_pcs]
    # perplexity must leave room for 3 * perplexity neighbours
    perplexity = float(min(perplexity, max(2.0, (adata.n_obs - 1) / 3.0)))
    emb = TSNE(
        n_components=2,
        perplexity=perplexity,
        initialization="pca",
        # exact kNN and Barnes-Hut below ~10,000 cells (FFT's grid is a fixed ~10 s cost there),
        # Annoy and FFT interpolation above
        neighbors="auto",
        negative_gradient_method="auto",
        random_state=seed,
        n_jobs=n_jobs,
        verbose=False,
    ).fit(np.ascontiguousarray(X, dtype=np.float64))
    adata.obsm["X_tsne"] = np.asarray(emb, dtype=np.float32)
    adata.uns["tsne"] = {"params": {"perplexity": perplexity, "method": "openTSNE", "seed": seed}}


def embed(
    adata,
    *,
    n_pcs: int = 40,
    scale: bool = True,
    n_neighbors: int = 10,
    umap_min_dist: float = 0.5,
    tsne_perplexity: float = 30.0,
    seed: int = 0,
    n_jobs: int = 1,
    matrix=None,
) -> dict:
    """PCA, kNN graph, UMAP and t-SNE in one call; records params in ``uns["cellatlas"]["embed"]``.
    ``matrix``: the HVG columns of X, read apart by the caller (``adata.X`` is then not used)."""
    summary = pca(adata, n_pcs=n_pcs, scale=scale, seed=seed, matrix=matrix)
    neighbors(adata, n_neighbors=n_neighbors, seed=seed)
    umap(adata, min_dist=umap_min_dist, seed=seed)
    tsne(adata, perplexity=tsne_perplexity, seed=seed, n_jobs=n_jobs)
    adata.uns[keys.UNS_KEY]["embed"] = {
        "params": {
            "n_pcs": n_pcs,
            "scale": scale,
            "n_neighbors": n_neighbors,
            "umap_min_dist": umap_min_dist,
            "tsne_perplexity": tsne_perplexity,
            "seed": seed,
        },
        "summary": summary,
    }
    return summary
