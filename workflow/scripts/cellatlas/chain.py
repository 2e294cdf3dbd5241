"""The stage entries of the main chain (ingest -> qc -> normalize -> embed -> cluster).

Each reads its input file, calls the library and returns a :class:`~cellatlas.stage.Result`
keyed by the rule's output names; :mod:`cellatlas.runner` writes and logs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cellatlas import keys, plotting
from cellatlas.errors import InputDataError
from cellatlas.stage import DatasetInput, Result, plot

#: QC removing more than this share of a dataset's cells is said on the terminal
NOTE_QC_SHARE = 0.05
#: fewest cells the maps are made of (a kNN graph, UMAP and t-SNE of fewer say nothing)
MIN_EMBED_CELLS = 10


def ingest_stage(dataset: str, spec: Mapping[str, Any], *, path: str | None) -> Result:
    from cellatlas.ingest import canonicalize, read_source, subset

    adata = read_source(dataset, spec["source"], path=path)
    adata = canonicalize(
        adata, dataset, matrix=spec["matrix"], values=spec["values"],
        label_key=spec["label_key"], batch_key=spec["batch_key"], donor_key=spec["donor_key"], path=path,
    )
    adata = subset(adata, dataset, **spec.get("subset", {}))
    # the source file where there is one (a simulated or scanpy-shipped source has none; the qc
    # run names the ingested file)
    return Result(metrics={"n_cells": adata.n_obs, "n_genes": adata.n_vars, "nnz": adata.X.nnz, "values": spec["values"]},
                  data={"h5ad": adata}, inputs=[DatasetInput(dataset, path, context="source")] if path else [])


def qc_stage(h5ad: str, dataset: str, p: Mapping[str, Any], *, seed: int) -> Result:
    import anndata as ad

    from cellatlas.qc import labels_losing_most, run_qc

    res = run_qc(
        ad.read_h5ad(h5ad), dataset, mode=p["mode"], fixed=p["fixed"], nmads=p["nmads"], nmads_mt=p["nmads_mt"],
        per_cluster=p["per_cluster"], min_cells=p["min_cells"], doublets=p["doublets"],
        remove_doublets=p["remove_doublets"], seed=seed, consume=True,
    )
    cells = res.cells.copy()
    cells.index.name = "cell"
    removed = res.summary["cells_in"] - res.summary["cells_kept"]
    notes = []
    if removed > NOTE_QC_SHARE * res.summary["cells_in"]:  # worth a look: rare types go first
        notes.append(f"dataset '{dataset}': QC removed {removed} of {res.summary['cells_in']} cells "
                     f"({removed / res.summary['cells_in']:.1%}); see qc/thresholds.tsv and qc/cells.tsv.gz")
    for label, n_in, n_out in labels_losing_most(res.removed)[["group", "cells_in", "removed"]].itertuples(index=False):
        notes.append(f"dataset '{dataset}': QC removed {n_out} of the {n_in} cells labelled '{label}' "
                     f"({n_out / n_in:.0%}); see qc/removed.tsv")
    return Result(notes=notes,
        metrics=res.summary, data={"h5ad": res.adata},
        tables={"thresholds": res.thresholds, "cells": cells.reset_index(), "removed": res.removed},
        figures={
            "histograms": plot(plotting.qc_histograms, res.cells, res.thresholds,
                               title=f"{dataset}: QC metrics of all cells, dataset bounds in red, clusters' faint"),
            "scatter": plot(plotting.qc_scatter, res.adata.obs, title=f"{dataset}: cells kept"),
        },
        inputs=[DatasetInput(dataset, h5ad)], not_logged={"cells"},
    )


def normalize_stage(h5ad: str, dataset: str, p: Mapping[str, Any]) -> Result:
    from cellatlas import h5ad_io
    from cellatlas.normalize import hvg_table, normalize

    data = h5ad_io.read(h5ad, without=())
    adata = data.adata
    if adata.uns[keys.UNS_KEY]["ingest"]["values"] == keys.VALUES_COUNTS:
        # X becomes log values in memory; the counts layer is the input's X, copied from disk
        data.layers_from = {keys.COUNTS_LAYER: "X"}
    summary = normalize(adata, dataset, target_sum=p["target_sum"], n_top_genes=p["n_top_genes"],
                        batch_aware=p["batch_aware"], keep_counts=False)
    return Result(metrics=summary, data={"h5ad": data}, tables={"hvg": hvg_table(adata).reset_index()},
                  figures={"figure": plot(plotting.hvg_dispersion, adata.var, title=f"{dataset}: highly variable genes")},
                  inputs=[DatasetInput(dataset, h5ad)])


def embed_stage(h5ad: str, dataset: str, p: Mapping[str, Any], *, seed: int, threads: int) -> Result:
    from cellatlas import h5ad_io
    from cellatlas.embed import embed

    # the maps need the HVG columns of X only, read block by block: the rest of X and the counts
    # stay on disk, and X is copied into the output, not written again
    data = h5ad_io.read(h5ad, without=("layers", "X"))
    adata = data.adata
    if adata.n_obs <= max(p["n_neighbors"], MIN_EMBED_CELLS):
        raise InputDataError(dataset, f"{adata.n_obs} cells are left to embed; the maps need more than "
                                      f"{max(p['n_neighbors'], MIN_EMBED_CELLS)} (embed.n_neighbors and a floor of "
                                      f"{MIN_EMBED_CELLS}): check subset and the QC thresholds")
    summary = embed(
        adata, n_pcs=p["n_pcs"], scale=p["scale"], n_neighbors=p["n_neighbors"], umap_min_dist=p["umap_min_dist"],
        tsne_perplexity=p["tsne_perplexity"], seed=seed, n_jobs=threads,
        matrix=h5ad_io.read_columns(h5ad, "X", adata.var["highly_variable"].to_numpy(dtype=bool)),
    )
    colors = plotting.annotation_colors(adata.obs)
    return Result(metrics=summary, data={"h5ad": data}, inputs=[DatasetInput(dataset, h5ad)], figures={
        "pca": plot(plotting.pca_variance, adata.uns["pca"]["variance_ratio"], title=f"{dataset}: PCA"),
        "umap": plot(plotting.embedding, adata.obsm["X_umap"], colors, basis="UMAP", title=dataset),
        "tsne": plot(plotting.embedding, adata.obsm["X_tsne"], colors, basis="t-SNE", title=dataset),
    })


def cluster_stage(h5ad: str, dataset: str, p: Mapping[str, Any], *, seed: int) -> Result:
    from cellatlas import h5ad_io
    from cellatlas.cluster import cluster

    # markers are tested on log-normalized X; the counts stay on disk, X is not written again
    data = h5ad_io.read(h5ad, without=("layers",), unchanged=("X",))
    adata = data.adata
    agreement, markers, summary = cluster(
        adata, resolutions=p["resolutions"], marker_resolution=p["marker_resolution"],
        marker_method=p["marker_method"], marker_n_genes=p["marker_n_genes"], seed=seed,
    )
    colors = {keys.leiden_key(r): adata.obs[keys.leiden_key(r)] for r in p["resolutions"]}
    if keys.LABEL in adata.obs:
        colors[keys.LABEL] = adata.obs[keys.LABEL]
    return Result(
        metrics=summary, data={"h5ad": data}, tables={"agreement": agreement, "markers": markers},
        figures={
            "umap": plot(plotting.embedding, adata.obsm["X_umap"], colors, basis="UMAP", title=f"{dataset}: Leiden clusters"),
            "dotplot": plot(plotting.marker_dotplot, adata, markers, resolution=p["marker_resolution"],
                            title=f"{dataset}: marker genes of the Leiden clusters (resolution {p['marker_resolution']:g})"),
        },
        inputs=[DatasetInput(dataset, h5ad)],
    )
