"""The integration methods, and the same methods fitted without one donor and asked to place it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import InputDataError

@dataclass
class Integrated:
    """One method's result: an embedding (cells x dimensions) or a kNN graph (distances)."""

    method: str
    embedding: np.ndarray | None = None
    graph: sp.csr_matrix | None = None
    #: what changes the meaning of the result (did not converge, one batch): shown and tagged
    notes: list[str] = field(default_factory=list)
    #: facts of the fit (iterations, epochs), logged as metrics
    info: dict[str, Any] = field(default_factory=dict)


def batch_sizes(adata) -> pd.Series:
    return adata.obs[keys.BATCH].astype(str).value_counts().sort_index()


def check_batches(adata, dataset: str, *, min_batch_cells: int) -> int:
    """The number of batches; a batch too small to estimate its effect is a one-line error."""
    if keys.BATCH not in adata.obs:
        raise InputDataError(dataset, "has no batch column: give the dataset a batch_key, or leave it out of "
                                      "integration.datasets")
    sizes = batch_sizes(adata)
    small = sizes[sizes < min_batch_cells]
    if len(sizes) > 1 and len(small):
        raise InputDataError(dataset, f"batch '{small.index[0]}' has {int(small.iloc[0])} cells after QC; integration "
                                      f"needs at least {min_batch_cells} per batch (integration.min_batch_cells): "
                                      "drop it with the dataset's subset, or merge it into another batch")
    return len(sizes)


def _harmony(adata, params: Mapping[str, Any], seed: int) -> Integrated:
    import harmonypy

    out = harmonypy.run_harmony(
        np.asarray(adata.obsm["X_pca"], dtype=np.float64), adata.obs[[keys.BATCH]].astype(str), [keys.BATCH],
        theta=params.get("theta", 2.0), max_iter_harmony=params.get("max_iter", 20), random_state=seed, verbose=False,
    )
    Z = np.asarray(out.Z_corr)  # cells x PCs (harmonypy 2.x)
    objective = np.asarray(out.objective_harmony, dtype=float)
    it = Integrated("harmony", embedding=Z.astype(np.float32), info={"iterations": max(len(objective) - 1, 0)})
    # harmonypy stops at max_iter whether or not the objective settled: say so when it did not
    if len(objective) >= 2:
        change = abs(objective[-1] - objective[-2]) / max(abs(objective[-2]), 1e-12)
        if change > params.get("epsilon", 0.01):
            it.notes.append(f"Harmony did not converge in {it.info['iterations']} iterations (last relative change "
                            f"{change:.3g}); raise integration.params.harmony.max_iter")
    if not np.isfinite(Z).all():
        raise FloatingPointError("Harmony returned non-finite coordinates")
    return it


def _bbknn(adata, params: Mapping[str, Any], seed: int) -> Integrated:
    import anndata as ad
    import bbknn

    tmp = ad.AnnData(obs=adata.obs[[keys.BATCH]].astype(str), obsm={"X_pca": adata.obsm["X_pca"]})
    bbknn.bbknn(tmp, batch_key=keys.BATCH, use_rep="X_pca", neighbors_within_batch=params.get("neighbors_within_batch", 3),
                trim=params.get("trim"), computation="cKDTree")
    return Integrated("bbknn", graph=sp.csr_matrix(tmp.obsp["distances"]),
                      info={"neighbors_per_cell": float(np.diff(tmp.obsp["distances"].indptr).mean())})


def _combat(adata, params: Mapping[str, Any], embed: Mapping[str, Any], seed: int) -> Integrated:
    """ComBat on the HVGs' log-expression (dense: ComBat's model is per gene), then the embed stage's PCA."""
    import anndata as ad
    import scanpy as sc

    from cellatlas.embed import pca

    hvg = adata.var["highly_variable"].to_numpy(bool)
    X = adata.X[:, hvg]
    tmp = ad.AnnData(X=np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64),
                     obs=adata.obs[[keys.BATCH]].astype(str))
    tmp.var["highly_variable"] = True
    sc.pp.combat(tmp, key=keys.BATCH)
    if not np.isfinite(tmp.X).all():
        raise FloatingPointError("ComBat returned non-finite values")
    pca(tmp, n_pcs=embed["n_pcs"], scale=embed["scale"], seed=seed)
    return Integrated("combat", embedding=tmp.obsm["X_pca"])


def integrate(adata, method: str, params: Mapping[str, Any], *, embed: Mapping[str, Any], seed: int = 0,
              latent: np.ndarray | None = None) -> Integrated:
    """Run ``method`` on ``adata`` (the embed stage's output: log-normalized X, HVGs, ``X_pca``).

    ``params`` are the method's (``integration.params.<method>``); ``embed`` the embed stage's
    (``n_pcs``, ``scale``) for methods that make their own PCA; ``latent`` the VAE's codes.
    """
    if method == "pca":
        return Integrated("pca", embedding=np.asarray(adata.obsm["X_pca"], dtype=np.float32))
    if method == "harmony":
        return _harmony(adata, params, seed)
    if method == "bbknn":
        return _bbknn(adata, params, seed)
    if method == "combat":
        return _combat(adata, params, embed, seed)
    if method == "vae":
        if latent is None:
            raise ValueError("the vae method needs the train_vae latent space")
        return Integrated("vae", embedding=np.asarray(latent, dtype=np.float32))
    raise ValueError(f"unknown integration method '{method}'")


def heldout_donor(adata, requested: str | None = None) -> str | None:
    """The donor held out of the fit: ``requested``, or the last donor (sorted) whose batch keeps
    another donor, so that the held-out cells' batch is one the fit knows. None without donors."""
    if keys.DONOR not in adata.obs or keys.BATCH not in adata.obs:
        return None
    pairs = adata.obs[[keys.DONOR, keys.BATCH]].astype(str).drop_duplicates()
    if requested is not None:
        return requested if requested in set(pairs[keys.DONOR]) else None
    donors_per_batch = pairs.groupby(keys.BATCH)[keys.DONOR].nunique()
    ok = pairs[pairs[keys.BATCH].map(donors_per_batch) > 1]
    return str(sorted(ok[keys.DONOR])[-1]) if len(ok) else None


def _pca_heldout(adata, held: np.ndarray, embed: Mapping[str, Any], seed: int) -> Integrated:
    from cellatlas.embed import gene_mean_sd, pca

    fit = adata[~held].copy()
    pca(fit, n_pcs=embed["n_pcs"], scale=embed["scale"], seed=seed)
    hvg = adata.var["highly_variable"].to_numpy(bool)
    X = sp.csr_matrix(adata.X[:, hvg], dtype=np.float64)
    if embed["scale"]:
        X = X @ sp.diags(1.0 / gene_mean_sd(X[~held])[1])
    loadings = np.asarray(fit.varm["PCs"], dtype=np.float64)[hvg]
    centre = np.asarray(X[~held].mean(axis=0)).ravel()
    emb = np.asarray(X @ loadings) - centre @ loadings
    return Integrated("pca", embedding=emb.astype(np.float32))


def integrate_heldout(adata, method: str, donor: str, *, embed: Mapping[str, Any], seed: int = 0) -> Integrated:
    """``method`` fitted on every cell but ``donor``'s, which it then places: the embedding of all cells.

    Only the PCA here; the VAE's is :func:`cellatlas.integrate.vae.vae_heldout` (it trains, in
    the training environment), and the other methods cannot place new cells.
    """
    held = adata.obs[keys.DONOR].astype(str).to_numpy() == donor
    if method == "pca":
        return _pca_heldout(adata, held, embed, seed)
    raise ValueError(f"the {method} method cannot place cells it was not fitted on")
