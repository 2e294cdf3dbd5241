"""Rules classify_model / regress_model: cross-validate one model on the task's folds, refit it
on all training cells, and log metrics, figures, predictions, informative genes and the model."""

from cellatlas.runner import run_stage


def body(smk, run):
    from threadpoolctl import threadpool_limits

    from cellatlas.classify.train import train_model

    # unbounded, OpenMP/BLAS take every core of the node: histogram boosting ran 10x slower
    # beside other jobs; the job gets the threads Snakemake (or SLURM) gave it
    with threadpool_limits(limits=smk.threads):
        train_model(
            h5ad=smk.input.h5ad, folds=smk.input.folds, meta=smk.input.meta, outputs=dict(smk.output.items()),
            dataset=smk.wildcards.dataset, task=smk.wildcards.task, model_name=smk.wildcards.model,
            model=smk.params.model, features=smk.params.features, importance=smk.params.importance,
            seed=smk.params.seed, threads=smk.threads, run=run,
        )


run_stage(snakemake, "classify", body)  # noqa: F821
