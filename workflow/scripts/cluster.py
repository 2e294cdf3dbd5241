"""Rule cluster: Leiden at several resolutions, ARI/NMI against labels, marker genes."""

from cellatlas.runner import run_stage


def body(smk, run):
    import anndata as ad

    from cellatlas import keys, plotting
    from cellatlas.cluster import cluster

    name, p = smk.wildcards.dataset, smk.params.cluster
    adata = ad.read_h5ad(smk.input[0])
    agreement, markers, summary = cluster(
        adata, resolutions=p["resolutions"], marker_resolution=p["marker_resolution"],
        marker_method=p["marker_method"], marker_n_genes=p["marker_n_genes"], seed=smk.params.seed,
    )
    adata.write_h5ad(smk.output.h5ad)
    agreement.to_csv(smk.output.agreement, sep="\t", index=False)
    markers.to_csv(smk.output.markers, sep="\t", index=False)
    colors = {keys.leiden_key(r): adata.obs[keys.leiden_key(r)] for r in p["resolutions"]}
    if keys.LABEL in adata.obs:
        colors[keys.LABEL] = adata.obs[keys.LABEL]
    plotting.embedding(adata.obsm["X_umap"], colors, smk.output.umap, basis="UMAP", title=f"{name}: Leiden clusters")
    run.log_metrics(summary)
    for path in (smk.output.agreement, smk.output.markers, smk.output.umap):
        run.log_artifact(path)


run_stage(snakemake, "cluster", body)  # noqa: F821
