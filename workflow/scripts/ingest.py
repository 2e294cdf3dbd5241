"""Rule ingest: read the dataset's source into the canonical AnnData."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.ingest import canonicalize, read_source, subset

    name, ds = smk.wildcards.dataset, smk.params.dataset
    path = smk.input.get("source")
    adata = read_source(name, ds["source"], path=path)
    adata = canonicalize(
        adata, name, matrix=ds["matrix"], values=ds["values"],
        label_key=ds["label_key"], batch_key=ds["batch_key"], donor_key=ds["donor_key"], path=path,
    )
    adata = subset(adata, name, **ds.get("subset", {}))
    adata.write_h5ad(smk.output.h5ad)
    run.log_metrics({"n_cells": adata.n_obs, "n_genes": adata.n_vars, "nnz": adata.X.nnz, "values": ds["values"]})


run_stage(snakemake, "ingest", body)  # noqa: F821
