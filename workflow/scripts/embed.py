"""Rule embed: PCA, kNN graph, UMAP and t-SNE, with figures."""

from cellatlas.runner import run_stage


def body(smk, run):
    import anndata as ad

    from cellatlas import plotting
    from cellatlas.embed import embed

    name, p = smk.wildcards.dataset, smk.params.embed
    adata = ad.read_h5ad(smk.input[0])
    summary = embed(
        adata, n_pcs=p["n_pcs"], scale=p["scale"], n_neighbors=p["n_neighbors"], umap_min_dist=p["umap_min_dist"],
        tsne_perplexity=p["tsne_perplexity"], seed=smk.params.seed, n_jobs=smk.threads,
    )
    adata.write_h5ad(smk.output.h5ad)
    colors = plotting.annotation_colors(adata.obs)
    plotting.pca_variance(adata.uns["pca"]["variance_ratio"], smk.output.pca, title=f"{name}: PCA")
    plotting.embedding(adata.obsm["X_umap"], colors, smk.output.umap, basis="UMAP", title=name)
    plotting.embedding(adata.obsm["X_tsne"], colors, smk.output.tsne, basis="t-SNE", title=name)
    run.log_metrics(summary)
    for path in (smk.output.pca, smk.output.umap, smk.output.tsne):
        run.log_artifact(path)


run_stage(snakemake, "embed", body)  # noqa: F821
