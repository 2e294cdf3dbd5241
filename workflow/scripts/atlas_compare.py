"""Rule atlas_compare: the methods of one atlas x query side by side."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import compare_job
    from cellatlas.tracking import log_to_parent

    wc, methods = smk.wildcards, smk.params.atlas["methods"]
    compare_job(records=dict(zip(methods, smk.input.records)), labels=dict(zip(methods, smk.input.labels)),
                outputs=smk.output, atlas=wc.atlas, reference=smk.params.atlas["reference"], query=wc.dataset, run=run)
    log_to_parent(smk.output.table, f"atlas/{wc.atlas}/{wc.dataset}")


wc = snakemake.wildcards  # noqa: F821
run_stage(snakemake, "atlas_compare", body, name=f"atlas_compare:{wc.atlas}/{wc.dataset}")  # noqa: F821
