"""Rule classify_split: check a task's target and fix its folds, shared by every model."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.classify.train import split_stage

    return split_stage(smk.input[0], dataset=smk.wildcards.dataset, task=smk.wildcards.task, spec=smk.params.task,
                       seed=smk.params.seed)


run_stage(snakemake, snakemake.wildcards.kind, compute, step="split", part="split")  # noqa: F821
