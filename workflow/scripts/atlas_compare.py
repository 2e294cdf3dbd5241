"""Rule atlas_compare: the methods of one atlas x query side by side."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import compare_job
    from cellatlas.tracking import log_to_parent

    wc = smk.wildcards
    records = {k[len("record_"):]: v for k, v in smk.input.items() if k.startswith("record_")}
    labels = {k[len("labels_"):]: v for k, v in smk.input.items() if k.startswith("labels_")}
    compare_job(records=records, labels=labels, outputs=smk.output, atlas=wc.atlas, reference=smk.params.reference,
                query=wc.dataset, run=run)
    log_to_parent(smk.output.table, f"atlas/{wc.atlas}/{wc.dataset}")


wc = snakemake.wildcards  # noqa: F821
run_stage(snakemake, "atlas_compare", body, name=f"atlas_compare:{wc.atlas}/{wc.dataset}")  # noqa: F821
