"""Rule qc: QC metrics, thresholds, doublet scores, filtered AnnData and figures."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.chain import qc_stage

    return qc_stage(smk.input[0], smk.wildcards.dataset, smk.params.qc, seed=smk.params.seed)


run_stage(snakemake, "qc", compute, step="qc")  # noqa: F821
