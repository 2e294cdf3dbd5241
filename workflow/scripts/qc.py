"""Rule qc: QC metrics, thresholds, doublet scores, filtered AnnData and figures."""

from cellatlas.runner import run_stage


def body(smk, run):
    import anndata as ad

    from cellatlas import plotting
    from cellatlas.qc import run_qc

    name, p = smk.wildcards.dataset, smk.params.qc
    res = run_qc(
        ad.read_h5ad(smk.input[0]), name, mode=p["mode"], fixed=p["fixed"], nmads=p["nmads"],
        nmads_mt=p["nmads_mt"], min_cells=p["min_cells"], doublets=p["doublets"],
        remove_doublets=p["remove_doublets"], seed=smk.params.seed,
    )
    res.adata.write_h5ad(smk.output.h5ad)
    res.thresholds.to_csv(smk.output.thresholds, sep="\t", index=False)
    res.cells.to_csv(smk.output.cells, sep="\t", index_label="cell")
    plotting.qc_histograms(res.cells, res.thresholds, smk.output.histograms, title=f"{name}: QC metrics of all cells, bounds in red")
    plotting.qc_scatter(res.adata.obs, smk.output.scatter, title=f"{name}: cells kept")
    run.log_metrics(res.summary)
    for path in (smk.output.thresholds, smk.output.histograms, smk.output.scatter):
        run.log_artifact(path)


run_stage(snakemake, "qc", body)  # noqa: F821
