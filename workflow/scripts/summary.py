"""Rule summary: one table across datasets from the stages' run records, one across models, one across atlases."""

from cellatlas.runner import run_stage


def compute(smk, live):
    import os

    from cellatlas.report import summary_stage
    from cellatlas.tracking import ENV_CONFIG_HASH

    return summary_stage(records=smk.input.records, comparisons=smk.input.comparisons, atlases=smk.input.atlases,
                         integrations=smk.input.integrations,
                         config_hash=os.environ.get(ENV_CONFIG_HASH, "unknown"))


run_stage(snakemake, "summary", compute, step="summary")  # noqa: F821
