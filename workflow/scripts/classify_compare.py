"""Rule classify_compare: rank a task's models and test their differences on the shared folds."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.classify.train import compare_models

    compare_models(
        fold_paths=dict(zip(smk.params.models, smk.input.folds)), meta=smk.input.meta,
        outputs=dict(smk.output.items()), dataset=smk.wildcards.dataset, task=smk.wildcards.task,
        test=smk.params.comparison["test"], alpha=smk.params.comparison["alpha"], run=run,
    )


run_stage(snakemake, "classify_compare", body)  # noqa: F821
