"""Rules classify_model / regress_model: cross-validate one model on the task's folds, refit it
on all training cells, describe it (figures, predictions, informative genes)."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from threadpoolctl import threadpool_limits

    from cellatlas.classify.train import model_stage

    # unbounded, OpenMP/BLAS take every core of the node: histogram boosting ran 10x slower
    # beside other jobs; the job gets the threads Snakemake (or SLURM) gave it
    with threadpool_limits(limits=smk.threads):
        return model_stage(
            h5ad=smk.input.h5ad, folds=smk.input.folds, meta=smk.input.meta, dataset=smk.wildcards.dataset,
            task=smk.wildcards.task, model_name=smk.wildcards.model, model=smk.params.model,
            features=smk.params.features, importance=smk.params.importance, seed=smk.params.seed, threads=smk.threads,
        )


run_stage(snakemake, "regress" if snakemake.rule == "regress_model" else "classify", compute, step="model")  # noqa: F821
