"""Rule summary: one table across datasets from the stages' run records."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.report import summarize
    from cellatlas.tracking import log_to_parent

    table = summarize(smk.input.records)
    table.to_csv(smk.output.table, sep="\t", index=False)
    run.log_artifact(smk.output.table)
    log_to_parent(smk.output.table)


run_stage(snakemake, "summary", body)  # noqa: F821
