"""Rule classify_compare: rank a task's models and test their differences on the shared folds."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.classify.train import compare_stage

    return compare_stage(
        fold_paths=dict(zip(smk.params.models, smk.input.folds)),
        records=dict(zip(smk.params.models, smk.input.records)), meta=smk.input.meta, dataset=smk.wildcards.dataset,
        task=smk.wildcards.task, test=smk.params.comparison["test"], alpha=smk.params.comparison["alpha"],
    )


run_stage(snakemake, snakemake.wildcards.kind, compute, step="compare", part="comparison")  # noqa: F821
