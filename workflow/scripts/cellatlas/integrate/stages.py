"""Stage entries of integration: one job per method (integrate, scored on its own), one that
compares them, chooses, and remakes the graph and maps on the chosen one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys, naming, plotting
from cellatlas.integrate import BASELINE, CANNOT_MAP, MAPS_NEW_CELLS, METHODS, REP
from cellatlas.stage import DatasetInput, Result, plot

log = logging.getLogger(__name__)

#: a failure of the method's own numerics: recorded as the method's result, the others go on
METHOD_FAILURES = (ArithmeticError, np.linalg.LinAlgError)


def _graph_mixing(graph: sp.spmatrix, obs: pd.DataFrame) -> float:
    import anndata as ad

    from cellatlas.cluster import batch_mixing

    return batch_mixing(ad.AnnData(obs=obs[[keys.BATCH]].copy(), obsp={"distances": sp.csr_matrix(graph)}))


def _knn_graph(embedding: np.ndarray, obs: pd.DataFrame, *, n_neighbors: int, seed: int):
    """scanpy's kNN graph of an embedding, as the embed stage builds it (``distances``, ``connectivities``)."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obs=pd.DataFrame(index=obs.index), obsm={REP: np.asarray(embedding, dtype=np.float32)})
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep=REP, random_state=seed)
    return tmp


def _scores(it, adata, *, seed: int, n_neighbors: int) -> dict:
    from cellatlas.integrate.scores import score

    labels = None
    if keys.LABEL in adata.obs:
        label = adata.obs[keys.LABEL]
        labels = np.where(label.isna(), "unlabelled", label.astype(str))
    row = score(labels=labels, batches=adata.obs[keys.BATCH].to_numpy(), embedding=it.embedding, graph=it.graph,
                unintegrated=np.asarray(adata.obsm["X_pca"]), seed=seed)
    graph = it.graph if it.graph is not None else _knn_graph(it.embedding, adata.obs, n_neighbors=n_neighbors,
                                                            seed=seed).obsp["distances"]
    row["batch_mixing"] = _graph_mixing(graph, adata.obs)
    return row


def method_stage(*, h5ad: str, dataset: str, method: str, params: Mapping[str, Any], settings: Mapping[str, Any],
                 embed: Mapping[str, Any], seed: int = 0, latent: str | None = None,
                 run_method: Callable[..., Any] | None = None, place_heldout: Callable[..., Any] | None = None) -> Result:
    """Rules integrate / integrate_vae: run one method on the embed stage's output and score it,
    with one donor held out of the fit where the method can place new cells.

    ``settings`` is the ``integration`` block (``min_batch_cells``, ``holdout``, ``holdout_donor``);
    ``run_method(adata)`` runs a method that trains here (vae_labels; the others are
    :func:`~cellatlas.integrate.methods.integrate`'s), ``place_heldout(adata, donor)`` fits the
    method without the donor and places it (the VAEs', from the integrate_vae job; the PCA's is
    :func:`~cellatlas.integrate.methods.integrate_heldout`).
    """
    import anndata as ad

    from cellatlas.integrate.methods import (
        Integrated, batch_sizes, check_batches, heldout_donor, integrate, integrate_heldout,
    )

    adata = ad.read_h5ad(h5ad)
    n_batches = check_batches(adata, dataset, min_batch_cells=settings["min_batch_cells"])
    wanted = settings.get("holdout_donor")
    donor = heldout_donor(adata, wanted) if settings["holdout"] else None
    if settings["holdout"] and wanted is not None and donor is None:
        from cellatlas.errors import InputDataError

        donors = sorted(adata.obs[keys.DONOR].astype(str).unique()) if keys.DONOR in adata.obs else []
        raise InputDataError(dataset, f"integration.holdout_donor '{wanted}' is not one of its donors "
                                      f"({', '.join(donors[:10]) or 'it has no donor column'})")
    if n_batches < 2:
        donor = None
    codes = None
    if latent is not None:
        codes = ad.read_h5ad(latent)
        if not codes.obs_names.equals(adata.obs_names):
            from cellatlas.errors import InputDataError

            raise InputDataError(dataset, f"the cells of '{latent}' differ from those of '{h5ad}'; rerun train_vae")
        codes = codes.obsm["X_vae"]
    notes: list[str] = []
    status = "ok"
    it = None
    if n_batches < 2:
        # nothing to integrate or to score: the PCA stands in, the table says why
        status = "one batch"
        if method == BASELINE:
            out_pca = integrate(adata, BASELINE, {}, embed=embed, seed=seed)
        else:
            notes.append(f"one batch ('{batch_sizes(adata).index[0]}'): nothing to integrate, {method} not run")
    else:
        try:
            it = (run_method(adata) if run_method is not None
                  else integrate(adata, method, params, embed=embed, seed=seed, latent=codes))
            notes += it.notes
        except METHOD_FAILURES as e:
            status = f"failed: {' '.join(str(e).split())[:200]}"
            notes.append(f"{method} failed ({status[8:]}); the comparison leaves it out")
    row: dict[str, Any] = {"dataset": dataset, "method": method, "status": status, "n_batches": n_batches,
                           "n_cells": adata.n_obs, "output": "graph" if it is not None and it.graph is not None else "embedding"}
    out = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names))
    if n_batches < 2 and method == BASELINE:
        out.obsm[REP] = out_pca.embedding
    metrics: dict[str, Any] = {}
    if it is not None:
        row.update(_scores(it, adata, seed=seed, n_neighbors=embed["n_neighbors"]))
        metrics.update({f"fit/{k}": v for k, v in it.info.items()})
        if it.embedding is not None:
            out.obsm[REP] = it.embedding
        else:
            out.obsp["distances"] = it.graph
    # held out: one donor left out of the fit, then placed by the fitted method
    row["heldout_donor"], row["heldout"] = "", CANNOT_MAP.get(method, "")
    if it is not None and method in MAPS_NEW_CELLS:
        if donor is None:
            row["heldout"] = "no donor to hold out (a donor column, and a batch with two donors, are needed)"
        else:
            held: Integrated = (place_heldout(adata, donor) if place_heldout is not None
                                else integrate_heldout(adata, method, donor, embed=embed, seed=seed))
            scores = _scores(held, adata, seed=seed, n_neighbors=embed["n_neighbors"])
            row["heldout_donor"], row["heldout"] = donor, MAPS_NEW_CELLS[method]
            for k in ("batch_correction", "bio_conservation", "total", "batch_mixing"):
                row[f"heldout_{k}"] = scores[k]
    for k, v in row.items():
        if isinstance(v, float | int | np.floating) and k not in ("n_batches", "n_cells"):
            metrics[naming.integration_metric(k)] = float(v)
    metrics.update({"n_batches": n_batches, "status": status})
    log.info("%s", pd.Series(row).to_string())
    return Result(metrics=metrics, data={"embedding": out}, tables={"scores": pd.DataFrame([row])}, notes=notes,
                  params={"heldout_donor": row["heldout_donor"] or "none"}, inputs=[DatasetInput(dataset, h5ad)])


def _tsne_of_graph(adata, seed: int) -> np.ndarray:
    """t-SNE from a graph's connectivities (a graph method has no coordinates to compute them from)."""
    from openTSNE import TSNEEmbedding, affinity, initialization

    P = sp.csr_matrix(adata.obsp["connectivities"], dtype=np.float64)
    aff = affinity.PrecomputedAffinities(P, normalize=True)
    init = initialization.rescale(np.asarray(adata.obsm["X_pca"][:, :2], dtype=np.float64))
    emb = TSNEEmbedding(init, aff, negative_gradient_method="bh", random_state=seed, verbose=False)
    emb = emb.optimize(n_iter=250, exaggeration=12).optimize(n_iter=500)
    return np.asarray(emb, dtype=np.float32)


def compare_stage(*, h5ad: str, dataset: str, embeddings: Mapping[str, str], scores: Sequence[str], use: str,
                  max_bio_loss: float, embed: Mapping[str, Any], seed: int = 0, threads: int = 1) -> Result:
    """Rule integrate_compare: the methods' scores in one table, the choice, and the embed stage's
    output remade on the chosen method: its graph, UMAP and t-SNE (``integrate.h5ad``, which the
    cluster stage reads)."""
    import anndata as ad

    from cellatlas.embed import tsne, umap
    from cellatlas.integrate.scores import choose, common_total

    table = pd.concat([pd.read_csv(p, sep="\t") for p in scores], ignore_index=True)
    table["status"] = table["status"].fillna("ok")
    table["total_common"] = common_total(table)
    table = table.assign(_o=table["method"].map(METHODS.index)).sort_values("_o").drop(columns="_o").reset_index(drop=True)
    chosen, reason = choose(table, use=use, max_bio_loss=max_bio_loss, order=METHODS)
    table["chosen"] = table["method"] == chosen
    log.info("integration of %s: %s (%s)\n%s", dataset, chosen, reason, table.to_string(index=False))

    from cellatlas import h5ad_io

    # the remade maps need no gene matrix: X and the counts are copied into integrate.h5ad from disk
    data = h5ad_io.read(h5ad, without=("X", "layers"))
    adata = data.adata
    result = ad.read_h5ad(embeddings[chosen])
    if not result.obs_names.equals(adata.obs_names):
        from cellatlas.errors import InputDataError

        raise InputDataError(dataset, f"the cells of '{embeddings[chosen]}' differ from those of '{h5ad}'; rerun it")
    if REP in result.obsm:
        adata.obsm[REP] = result.obsm[REP]
        graph = _knn_graph(adata.obsm[REP], adata.obs, n_neighbors=embed["n_neighbors"], seed=seed)
        for key in ("distances", "connectivities"):
            adata.obsp[key] = graph.obsp[key]
        adata.uns["neighbors"] = graph.uns["neighbors"]
        umap(adata, min_dist=embed["umap_min_dist"], seed=seed)
        tsne(adata, perplexity=embed["tsne_perplexity"], seed=seed, n_jobs=threads, rep=REP)
    else:
        from scanpy.neighbors._connectivity import umap as fuzzy_graph

        from cellatlas.integrate.scores import shortest_path_neighbors

        # a graph method: its graph is the kNN graph; UMAP and t-SNE come from its fuzzy weights
        # over each cell's nearest cells along the graph (it has no coordinates)
        k = int(embed["n_neighbors"])
        near = shortest_path_neighbors(result.obsp["distances"], k)
        adata.obsp["distances"] = sp.csr_matrix(result.obsp["distances"])
        adata.obsp["connectivities"] = fuzzy_graph(near.indices, near.distances, n_obs=adata.n_obs, n_neighbors=k)
        adata.uns["neighbors"] = {"params": {"n_neighbors": k, "method": chosen, "random_state": seed,
                                             # UMAP's spectral start reads this, never X (not read here)
                                             "use_rep": "X_pca"},
                                  "distances_key": "distances", "connectivities_key": "connectivities"}
        # spectral: the PCA this graph was built from still holds the batches the graph has joined,
        # and a start from it would keep them apart
        umap(adata, min_dist=embed["umap_min_dist"], seed=seed, start="spectral")
        adata.obsm["X_tsne"] = _tsne_of_graph(adata, seed)
    choice = {"dataset": dataset, "use": use, "method": chosen, "reason": reason, "max_bio_loss": max_bio_loss,
              "atlas_map": "the projection method's map" if chosen == BASELINE else
              "the latent method's map" if chosen == "vae" else
              f"the PCA (projection) and VAE (latent) maps, as without integration ({chosen}: {CANNOT_MAP[chosen]})"}
    adata.uns[keys.UNS_KEY]["integrate"] = dict(choice)
    colors = plotting.annotation_colors(adata.obs)
    row = table.set_index("method").loc[chosen]
    metrics: dict[str, Any] = {"integration": chosen, "reason": reason}
    for k in ("total", "batch_correction", "bio_conservation", "batch_mixing"):
        if pd.notna(row.get(k)):
            metrics[f"chosen/{k}"] = float(row[k])
    for r in table.itertuples():
        if pd.notna(getattr(r, "total", np.nan)):
            metrics[f"{r.method}/total"] = float(r.total)
    title = f"{dataset}: integrated with {chosen}"
    return Result(
        metrics=metrics, data={"h5ad": data}, tables={"table": table}, records={"choice": choice},
        params={"integration": chosen},
        figures={
            "figure": plot(plotting.integration_scores, table, title=f"{dataset}: integration methods (scIB metrics)"),
            "umap": plot(plotting.embedding, adata.obsm["X_umap"], colors, basis="UMAP", title=title),
            "tsne": plot(plotting.embedding, adata.obsm["X_tsne"], colors, basis="t-SNE", title=title),
        },
        inputs=[DatasetInput(dataset, h5ad)],
    )
