"""Rule normalize: total-count + log1p (counts kept in a layer), highly variable genes."""

from cellatlas.runner import run_stage


def body(smk, run):
    import anndata as ad

    from cellatlas import plotting
    from cellatlas.normalize import hvg_table, normalize

    name, p = smk.wildcards.dataset, smk.params.normalize
    adata = ad.read_h5ad(smk.input[0])
    summary = normalize(adata, name, target_sum=p["target_sum"], n_top_genes=p["n_top_genes"], batch_aware=p["batch_aware"])
    adata.write_h5ad(smk.output.h5ad)
    hvg_table(adata).to_csv(smk.output.hvg, sep="\t")
    plotting.hvg_dispersion(adata.var, smk.output.figure, title=f"{name}: highly variable genes")
    run.log_metrics(summary)
    for path in (smk.output.hvg, smk.output.figure):
        run.log_artifact(path)


run_stage(snakemake, "normalize", body)  # noqa: F821
