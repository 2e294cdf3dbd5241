"""The reference map: what the reference's stages fitted, gathered once per atlas, and the label Gaussians behind the confidence."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import AtlasError

from cellatlas.atlas import GRAPH, PCA, TAIL, UMAP, UNASSIGNED, VAE, VAE_UMAP
from cellatlas.atlas.genes import align_genes, check_overlap, id_column

log = logging.getLogger(__name__)


#: labels with fewer reference cells get the pooled within-label covariance and distances
MIN_LABEL_CELLS = 10


def label_gaussians(rep: np.ndarray, labels: pd.Categorical, *, seed: int = 0, n_folds: int = 5):
    """Per label: mean and Ledoit-Wolf precision of ``rep``, and every cell's out-of-fold
    Mahalanobis distance to its own label (the reference distribution proximity is read from).

    Out-of-fold, because a cell that helped fit its label's covariance looks closer to it than a
    new cell would. A label with fewer than :data:`MIN_LABEL_CELLS` cells has too few to fit or
    to judge by: it gets the covariance pooled over every label (cells centred on their label's
    mean) and is judged against all cells' distances under that pooled model (``pooled``).
    Returns (means, precisions, null, pooled).
    """
    from sklearn.covariance import LedoitWolf

    rep = np.asarray(rep, dtype=np.float64)
    codes = np.asarray(labels.codes)
    L, d = len(labels.categories), rep.shape[1]
    means = np.stack([rep[codes == c].mean(axis=0) if (codes == c).any() else np.zeros(d) for c in range(L)])
    centred = rep - means[codes]
    pooled_fit = LedoitWolf(assume_centered=True).fit(centred)
    pooled = mahalanobis(centred, np.zeros(d), pooled_fit.precision_)
    precisions = np.repeat(pooled_fit.precision_[None], L, axis=0)
    null = pooled.copy()
    rng = np.random.default_rng(seed)
    for c in range(L):
        rows = np.flatnonzero(codes == c)
        if len(rows) < MIN_LABEL_CELLS:
            continue
        Z = rep[rows]
        precisions[c] = LedoitWolf().fit(Z).precision_
        fold = rng.permutation(len(rows)) % n_folds
        for f in range(n_folds):
            train = fold != f
            part = LedoitWolf().fit(Z[train])
            null[rows[~train]] = mahalanobis(Z[~train], part.location_, part.precision_)
    return means, precisions, null, pooled


def mahalanobis(X: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    D = np.asarray(X, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", D, precision, D), 0.0))


def proximity(distance: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of ``reference`` distances at least ``distance``, over :data:`TAIL`, capped at 1."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    at_least = (len(ref) - np.searchsorted(ref, distance, side="left")) / max(len(ref), 1)
    return np.minimum(1.0, at_least / TAIL)


def _add_label_models(out, rep: str, seed: int) -> None:
    labels = out.obs[keys.LABEL].cat
    have = np.asarray(out.obs[keys.LABEL].notna())
    means, precisions, null, pooled = label_gaussians(out.obsm[rep][have], pd.Categorical.from_codes(
        labels.codes[have], categories=labels.categories), seed=seed)
    for name, values in ((f"{rep}_mahalanobis", null), (f"{rep}_mahalanobis_pooled", pooled)):
        col = np.full(out.n_obs, np.nan)
        col[have] = values
        out.obs[name] = col
    out.uns[f"{rep}_label_means"], out.uns[f"{rep}_label_precisions"] = means, precisions


def map_genes(adata, query_genes: Mapping[str, pd.DataFrame] | None, *, atlas: str, reference: str,
              min_shared_genes: int = 100) -> np.ndarray:
    """The genes the map's PCA is on: the reference's HVGs that every query of the atlas has.

    A query that lacks some of them (another panel, chemistry or species) would otherwise be
    projected with those genes at the reference mean: their share of each PC is lost, and
    cells of different types fall together (PBMC 3k -> pbmc68k_reduced, which has 227 of the
    2,000 HVGs: 0.77 against 0.86 lenient accuracy; benchmarks/RESULTS.md).
    """
    hvg = adata.var["highly_variable"].to_numpy(bool)
    shared = hvg.copy()
    for query, var in (query_genes or {}).items():
        align = align_genes(adata.var, var)
        check_overlap(align, hvg, atlas=atlas, reference=reference, query=query, what="the reference PCA",
                      min_shared=min_shared_genes)
        shared &= align.present
    if shared.sum() < min_shared_genes:
        raise AtlasError(atlas, f"reference '{reference}' and its queries {', '.join(query_genes or {})} share "
                                f"{int(shared.sum())} of its {int(hvg.sum())} HVGs; at least {min_shared_genes} "
                                "are needed (atlas.min_shared_genes)")
    return shared


def refit_pca(adata, genes: np.ndarray, *, scale: bool, seed: int) -> None:
    """``adata``'s PCA and kNN graph again, in place, on ``genes`` only, as embed fitted them on its HVGs."""
    from cellatlas import embed

    n_pcs = int(adata.obsm[PCA].shape[1])
    n_neighbors = int(adata.uns["neighbors"]["params"]["n_neighbors"])
    adata.var["highly_variable"] = genes
    embed.pca(adata, n_pcs=n_pcs, scale=scale, seed=seed)
    embed.neighbors(adata, n_neighbors=n_neighbors, seed=seed)


def build_reference(adata, *, atlas: str, reference: str, label_key: str, seed: int = 0,
                    query_genes: Mapping[str, pd.DataFrame] | None = None, min_shared_genes: int = 100):
    """The reference map of ``adata`` (the reference's embed.h5ad) as a compact AnnData.

    The map has no expression matrix: ``var`` holds each gene's mean and sd (log-normalized),
    ``highly_variable`` (the genes of the map's PCA: the reference's HVGs that every query in
    ``query_genes``, query name -> its var, has; :func:`map_genes`), its id, and its mean share of
    a cell's counts; ``varm["PCs"]``; ``obs`` the label and the cell's donor (else batch) as
    ``group``; ``obsm`` the PCA and UMAP coordinates; ``obsp`` the kNN distances; ``uns`` the
    label Gaussians and the median library size. Where a query lacks some of the reference's
    HVGs, the PCA and kNN graph are fitted again on the shared ones (the UMAP stays the reference's).
    """
    import anndata as ad

    if label_key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns[:15]))
        raise AtlasError(atlas, f"reference '{reference}' has no obs column '{label_key}' "
                                f"(atlas.atlases.{atlas}.label_key; columns: {cols})")
    labels = adata.obs[label_key]
    if labels.nunique() < 2:
        raise AtlasError(atlas, f"reference '{reference}': label column '{label_key}' has {labels.nunique()} distinct "
                                "label(s); transferring labels needs at least 2")
    if UNASSIGNED in set(labels.dropna().astype(str)):
        raise AtlasError(atlas, f"reference '{reference}': label '{UNASSIGNED}' is reserved for cells the mapping "
                                "cannot assign")
    scaled = bool(adata.uns.get("pca", {}).get("params", {}).get("scale", True))
    n_hvg = int(adata.var["highly_variable"].sum())
    genes = map_genes(adata, query_genes, atlas=atlas, reference=reference, min_shared_genes=min_shared_genes)
    if genes.sum() < n_hvg:
        log.warning("atlas '%s': its queries share %d of the %d HVGs of reference '%s'; the map's PCA is fitted "
                    "again on those", atlas, int(genes.sum()), n_hvg, reference)
        refit_pca(adata, genes, scale=scaled, seed=seed)
    from cellatlas.embed import gene_mean_sd

    mean, sd = gene_mean_sd(adata.X)
    var = pd.DataFrame({"mean": mean, "sd": sd if scaled else np.ones_like(sd),
                        "highly_variable": adata.var["highly_variable"].to_numpy(bool)}, index=adata.var_names.copy())
    if (idc := id_column(adata.var)) is not None:
        var[idc] = adata.var[idc].astype(str).to_numpy()
    median_library = 0.0
    if keys.COUNTS_LAYER in adata.layers:
        counts = sp.csr_matrix(adata.layers[keys.COUNTS_LAYER], dtype=np.float64)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        median_library = float(np.median(lib))
        lib[lib == 0] = 1.0
        var["count_share"] = np.asarray(sp.diags(1.0 / lib).dot(counts).mean(axis=0)).ravel()
    obs = pd.DataFrame({keys.LABEL: pd.Categorical(labels.astype("string").astype(object).where(labels.notna(), None))},
                       index=adata.obs_names.copy())
    # the folds of the held-out cells the mapping is calibrated on are grouped by it
    for key in (keys.DONOR, keys.BATCH):
        if key in adata.obs:
            obs["group"] = adata.obs[key].astype(str).to_numpy()
            break
    out = ad.AnnData(obs=obs, var=var, obsm={PCA: adata.obsm[PCA], UMAP: adata.obsm[UMAP]},
                     varm={"PCs": adata.varm["PCs"]})
    out.obsp[GRAPH[PCA]] = sp.csr_matrix(adata.obsp["distances"])
    _add_label_models(out, PCA, seed)
    neighbors = dict(adata.uns["neighbors"]["params"])
    out.uns["neighbors"] = {"n_neighbors": int(neighbors["n_neighbors"]), "random_state": int(neighbors.get("random_state", seed))}
    out.uns["umap"] = {k: float(v) for k, v in adata.uns["umap"]["params"].items() if k in ("a", "b")}
    out.uns["median_library"] = median_library
    summary: dict[str, Any] = {"n_cells": adata.n_obs, "n_genes": adata.n_vars, "n_hvg": n_hvg,
                               "n_map_genes": int(genes.sum()),
                               "n_labels": int(labels.nunique()), "n_pcs": int(adata.obsm[PCA].shape[1])}
    out.uns[keys.UNS_KEY] = {"atlas_reference": {"atlas": atlas, "reference": reference, "label_key": label_key,
                                                 "summary": summary}}
    return out, summary


def build_reference_vae(ref, vae, *, atlas: str, reference: str, seed: int = 0):
    """The VAE part of the map: ``vae`` (the reference's train/vae embedding) with the map's
    labels, the latent space's kNN graph (as train_vae built its UMAP) and its label Gaussians.

    Kept apart from the PCA map, so that retraining the VAE reruns only the latent mappings.
    """
    import anndata as ad
    import scanpy as sc

    if not vae.obs_names.equals(ref.obs_names):
        raise AtlasError(atlas, f"reference '{reference}': the VAE embedding's cells differ from the reference map's")
    out = ad.AnnData(obs=ref.obs[[keys.LABEL]].copy(), obsm={VAE: vae.obsm[VAE], VAE_UMAP: vae.obsm[VAE_UMAP]})
    sc.pp.neighbors(out, n_neighbors=int(ref.uns["neighbors"]["n_neighbors"]), use_rep=VAE, random_state=seed)
    out.obsp[GRAPH[VAE]] = out.obsp.pop("distances")
    del out.obsp["connectivities"], out.uns["neighbors"]
    _add_label_models(out, VAE, seed)
    return out, {"n_cells": out.n_obs, "n_latent": int(vae.obsm[VAE].shape[1])}


def with_vae(ref, vae_map):
    """The map with its VAE part added (in memory)."""
    if not vae_map.obs_names.equals(ref.obs_names):
        raise ValueError("the VAE map's cells differ from the reference map's")
    ref = ref.copy()
    for key in (VAE, VAE_UMAP):
        ref.obsm[key] = vae_map.obsm[key]
    ref.obsp[GRAPH[VAE]] = vae_map.obsp[GRAPH[VAE]]
    for col in (f"{VAE}_mahalanobis", f"{VAE}_mahalanobis_pooled"):
        ref.obs[col] = vae_map.obs[col].to_numpy()
    for key in (f"{VAE}_label_means", f"{VAE}_label_precisions"):
        ref.uns[key] = vae_map.uns[key]
    return ref
