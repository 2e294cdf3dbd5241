"""The learned embedding: a negative-binomial VAE on a dataset's counts, its latent space
clustered and mapped like the PCA embedding, and the two compared against the labels."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys, naming
from cellatlas.errors import CellAtlasError, InputDataError
from cellatlas.stage import DatasetInput, Model, Result, plot

log = logging.getLogger(__name__)

#: obsm keys written
LATENT = "X_vae"
UMAP = "X_umap_vae"


def vae_leiden_key(resolution: float) -> str:
    return "vae_" + keys.leiden_key(resolution)


#: how the VAE's genes are chosen: the normalize stage's HVGs, or as many by Pearson residuals of the counts
GENE_CHOICES = ("hvg", "pearson_residuals")


def pearson_residual_genes(adata, n_genes: int) -> np.ndarray:
    """Mask of the ``n_genes`` genes whose counts' Pearson residuals vary most (per batch when
    there are batches), as scanpy computes them; measured on PBMC 3k, a VAE reading these genes
    comes closer to the PCA embedding's clusters than one reading the log-data HVGs."""
    import anndata as ad
    import scanpy as sc

    counts = ad.AnnData(sp.csr_matrix(adata.layers[keys.COUNTS_LAYER], dtype=np.float32))
    batch = None
    if keys.BATCH in adata.obs and adata.obs[keys.BATCH].nunique() > 1:
        counts.obs[keys.BATCH] = adata.obs[keys.BATCH].astype(str).to_numpy()
        batch = keys.BATCH
    sc.experimental.pp.highly_variable_genes(counts, flavor="pearson_residuals", n_top_genes=min(n_genes, adata.n_vars),
                                             batch_key=batch)
    return counts.var["highly_variable"].to_numpy()


def training_matrix(adata, *, dataset: str, genes: str = "hvg"):
    """Counts (CSR float32) of the genes the VAE reads, and those genes' names.

    ``genes``: ``hvg`` (the normalize stage's highly variable genes; every gene when there are
    none) or ``pearson_residuals`` (as many genes, chosen by :func:`pearson_residual_genes`).
    """
    if keys.COUNTS_LAYER not in adata.layers:
        raise InputDataError(dataset, "has no raw counts (its values are log-normalized); the VAE's negative-binomial "
                                      "likelihood needs counts: leave it out of train.embedding.datasets")
    if genes not in GENE_CHOICES:
        raise ValueError(f"train.embedding.genes '{genes}' is not one of {GENE_CHOICES}")
    names = adata.var_names
    X = adata.layers[keys.COUNTS_LAYER]
    hvg = adata.var["highly_variable"].to_numpy() if "highly_variable" in adata.var else np.zeros(adata.n_vars, bool)
    if genes == "pearson_residuals":
        hvg = pearson_residual_genes(adata, int(hvg.sum()) or adata.n_vars)
    if hvg.any():
        X, names = X[:, hvg], names[hvg]
    return sp.csr_matrix(X, dtype=np.float32), list(map(str, names))


def train_vae(adata, *, dataset: str, model: Mapping[str, Any], trainer: Mapping[str, Any], seed: int = 0,
              tracking: Mapping[str, str] | None = None, checkpoint: str | None = None,
              classification_weight: float | None = None):
    """Train the VAE on ``adata``'s counts; ``obsm[LATENT]`` gets the posterior means.

    ``model`` is the config's ``train.embedding`` block (architecture, optimizer, epochs,
    ``batch_size``, ``val_fraction``, ``batch_correct``); keys it lacks take the schema's defaults.
    Validation cells are whole donors when the dataset has enough of them. With a
    ``classification_weight`` the VAE also learns the labels (``obs["label"]``; unlabelled cells
    only reconstruct), as scANVI does. Returns the :class:`~cellatlas.deep.training.FitResult`.
    """
    from cellatlas.config import schema_defaults
    from cellatlas.deep.data import CellDataModule, CSRTensors, SparseBatches
    from cellatlas.deep.plans import VAEPlan
    from cellatlas.deep.training import TrainerSettings, fit
    from cellatlas.deep.training import seed as seed_all

    model = {**schema_defaults("train", "embedding"), **model}
    X, genes = training_matrix(adata, dataset=dataset, genes=model["genes"])
    batches, codes = None, None
    if model["batch_correct"] and keys.BATCH in adata.obs and adata.obs[keys.BATCH].nunique() > 1:
        cat = pd.Categorical(adata.obs[keys.BATCH].astype(str))
        batches, codes = list(map(str, cat.categories)), cat.codes.astype(np.int64)
    groups = adata.obs[keys.DONOR].astype(str).to_numpy() if keys.DONOR in adata.obs else None
    y, classes = None, []
    if classification_weight is not None:
        if keys.LABEL not in adata.obs:
            raise InputDataError(dataset, "has no labels for the semi-supervised VAE (vae_labels): give it a label_key")
        cat = pd.Categorical(adata.obs[keys.LABEL])
        y, classes = cat.codes.astype(np.int64), list(map(str, cat.categories))
    settings = TrainerSettings.from_mapping(trainer)
    settings.max_epochs, settings.patience = model["max_epochs"], model["patience"]
    seed_all(seed)
    plan = VAEPlan(
        n_genes=X.shape[1], n_latent=model["n_latent"], hidden=model["hidden"], n_layers=model["n_layers"],
        n_batches=len(batches or []), dropout=model["dropout"], lr=model["lr"], weight_decay=model["weight_decay"],
        kl_warmup_epochs=model["kl_warmup_epochs"], encoder_input=model["encoder_input"], kl_weight=model["kl_weight"],
        genes=genes, batches=batches, n_classes=len(classes), classification_weight=classification_weight or 0.0,
    )
    data = CellDataModule(X, y=y, covariate=codes, groups=groups, val_fraction=model["val_fraction"],
                          batch_size=model["batch_size"], seed=seed, on_device=settings.data_on_device)
    try:
        result = fit(plan, data, settings, tracking=tracking, prefix=naming.CURVE, checkpoint=checkpoint)
    except CellAtlasError as e:
        raise InputDataError(dataset, f"VAE: {e}") from None
    plan = result.plan.cpu()
    every = SparseBatches(CSRTensors.from_scipy(X), np.arange(X.shape[0]), covariate=codes, batch_size=4096)
    adata.obsm[LATENT] = plan.embed(every)
    return result


def cluster_embedding(adata, *, n_neighbors: int, resolutions: list[float], umap_min_dist: float, seed: int = 0):
    """kNN graph, Leiden and UMAP on ``obsm[LATENT]``.

    Returns
    -------
    ``(table, mixing)``: the table compares the VAE's and the PCA embedding's clusters
    (``obs[leiden_r*]``) with the labels at each resolution; ``mixing`` is empty unless the dataset
    has batches, and then holds how well the VAE's kNN graph mixes them (``batch_mixing``) and,
    where ``adata`` has the embed stage's graph, the PCA graph's (``batch_mixing_pca``), as
    :func:`cellatlas.cluster.batch_mixing` measures them.
    """
    import anndata as ad
    import scanpy as sc

    from cellatlas.cluster import agreement, batch_mixing, leiden
    from cellatlas.embed import umap

    emb = ad.AnnData(obs=adata.obs[[c for c in (keys.LABEL, keys.BATCH) if c in adata.obs]].copy(),
                     obsm={LATENT: adata.obsm[LATENT]})
    sc.pp.neighbors(emb, n_neighbors=n_neighbors, use_rep=LATENT, random_state=seed)
    leiden(emb, resolutions=resolutions, seed=seed)
    umap(emb, min_dist=umap_min_dist, seed=seed)
    vae = agreement(emb, resolutions=resolutions)
    for r in resolutions:
        adata.obs[vae_leiden_key(r)] = emb.obs[keys.leiden_key(r)].to_numpy()
    adata.obsm[UMAP] = emb.obsm["X_umap"]
    have_pca = all(keys.leiden_key(r) in adata.obs for r in resolutions)
    pca = agreement(adata, resolutions=resolutions) if have_pca else None
    table = vae.rename(columns={c: f"{c}_vae" for c in ("n_clusters", "ari", "nmi")})
    if pca is not None:
        table = table.merge(pca[["resolution", "n_clusters", "ari", "nmi"]].rename(
            columns={c: f"{c}_pca" for c in ("n_clusters", "ari", "nmi")}), on="resolution")
    mixing = {"batch_mixing": batch_mixing(emb)}
    if "distances" in adata.obsp:
        mixing["batch_mixing_pca"] = batch_mixing(adata)
    return table, {k: v for k, v in mixing.items() if not np.isnan(v)}


def train_stage(*, h5ad: str, dataset: str, model: Mapping[str, Any], trainer: Mapping[str, Any], seed: int = 0,
                tracking: Mapping[str, str] | None = None, workspace: str | Path = ".") -> Result:
    """The train_vae rule: train on the normalize stage's counts and encode every cell.

    The latent space is clustered by its own job (:func:`cluster_stage`), so a change of Leiden
    resolution never retrains the VAE.
    """
    import anndata as ad

    from cellatlas import plotting

    adata = ad.read_h5ad(h5ad)
    checkpoint = Path(workspace) / "model.ckpt"
    result = train_vae(adata, dataset=dataset, model=model, trainer=trainer, seed=seed, tracking=tracking,
                       checkpoint=str(checkpoint))
    history = pd.DataFrame(result.history)
    latent = ad.AnnData(obs=adata.obs.copy(), obsm={LATENT: adata.obsm[LATENT]})
    latent.uns[keys.UNS_KEY] = {"train_vae": {"params": dict(model), "genes": len(result.plan.hparams.genes)}}
    summary: dict[str, Any] = {**naming.fit_metrics(result.summary()), "device": result.device,
                               "precision": result.precision, "validation_split": result.split,
                               "n_genes": int(result.plan.hparams.n_genes), "n_latent": int(model["n_latent"]),
                               "n_batches": int(result.plan.hparams.n_batches)}
    return Result(
        metrics=summary, data={"latent": latent}, tables={"history": history}, files={"checkpoint": checkpoint},
        figures={"curves": plot(plotting.training_curves, history,
                                title=f"{dataset}: VAE ({result.device}, {result.precision})")},
        models={"model": Model(result.plan.net, flavor="torch")}, inputs=[DatasetInput(dataset, h5ad, context="training")],
    )


def cluster_stage(*, latent: str, clustered: str, dataset: str, embed: Mapping[str, Any], cluster: Mapping[str, Any],
                  seed: int = 0) -> Result:
    """The cluster_vae rule: the VAE's latent space clustered and mapped like the PCA embedding
    (``clustered``: the cluster stage's output), and the two compared against the labels."""
    import anndata as ad

    from cellatlas import h5ad_io, plotting
    from cellatlas.cluster import agreement_summary

    adata = h5ad_io.read(clustered, without=("X", "layers")).adata  # the VAE's clusters need no gene matrix
    codes = ad.read_h5ad(latent)
    if not codes.obs_names.equals(adata.obs_names):
        raise InputDataError(dataset, f"the cells of '{latent}' differ from those of '{clustered}'; rerun train_vae")
    adata.obsm[LATENT] = codes.obsm[LATENT]
    resolutions = list(cluster["resolutions"])
    table, mixing = cluster_embedding(adata, n_neighbors=embed["n_neighbors"], resolutions=resolutions,
                                      umap_min_dist=embed["umap_min_dist"], seed=seed)
    colors = {key: adata.obs[key] for key in (keys.LABEL, keys.BATCH) if key in adata.obs}
    r = cluster["marker_resolution"]
    colors[vae_leiden_key(r)] = adata.obs[vae_leiden_key(r)]
    out = ad.AnnData(obs=adata.obs.copy(), obsm={k: adata.obsm[k] for k in (LATENT, UMAP, "X_pca", "X_umap") if k in adata.obsm})
    out.uns[keys.UNS_KEY] = codes.uns.get(keys.UNS_KEY, {})
    summary: dict[str, Any] = {}
    vae = table.rename(columns={f"{c}_vae": c for c in ("n_clusters", "ari", "nmi")})
    summary.update(agreement_summary(vae))
    summary.update(mixing)
    if "best_ari" in summary and "ari_pca" in table:
        summary["best_ari_pca"] = float(table["ari_pca"].max())
    log.info("%s", table.to_string(index=False))
    if mixing:
        log.info("batch mixing of the kNN graph (1: as mixed as random neighbours): %s",
                 ", ".join(f"{k} {v:.3f}" for k, v in mixing.items()))
    return Result(
        metrics=summary, data={"h5ad": out}, tables={"clusters": table}, inputs=[DatasetInput(dataset, latent)],
        figures={"umap": plot(plotting.embedding, adata.obsm[UMAP], colors, basis="UMAP",
                              title=f"{dataset}: UMAP of the VAE's {adata.obsm[LATENT].shape[1]}-d latent space")},
    )


def load_vae(checkpoint: str | Path):
    """The trained plan of a ``model.ckpt`` (hyperparameters, gene names and batches included)."""
    from cellatlas.deep.plans import VAEPlan

    # weights_only: a checkpoint builds tensors and plain values, never runs code (and its digest was checked)
    return VAEPlan.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True)
