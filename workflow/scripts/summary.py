"""Rule summary: one table across datasets from the stages' run records, one across models, one across atlases."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.report import summarize, summarize_atlases, summarize_models
    from cellatlas.tracking import log_to_parent

    table = summarize(smk.input.records)
    table.to_csv(smk.output.table, sep="\t", index=False)
    models = summarize_models(smk.input.comparisons)
    models.to_csv(smk.output.models, sep="\t", index=False)
    atlases = summarize_atlases(smk.input.atlases)
    atlases.to_csv(smk.output.atlases, sep="\t", index=False)
    for path in (smk.output.table, smk.output.models, smk.output.atlases):
        run.log_artifact(path)
        log_to_parent(path)


run_stage(snakemake, "summary", body)  # noqa: F821
