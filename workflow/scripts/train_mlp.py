"""Rule train_mlp: an mlp model of a classify task, cross-validated on the task's folds with
Lightning, refitted on all training cells (its curves live in MLflow), described like every model."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.classify.train import model_stage

    return model_stage(
        h5ad=smk.input.h5ad, folds=smk.input.folds, meta=smk.input.meta, dataset=smk.wildcards.dataset,
        task=smk.wildcards.task, model_name=smk.wildcards.model, model=smk.params.model, features=smk.params.features,
        importance=smk.params.importance, seed=smk.params.seed, threads=smk.threads, trainer=smk.params.trainer,
        tracking=live.tracking, workspace=live.workspace,
    )


# guarded: data-parallel training spawns workers that import this file again
if __name__ == "__main__":
    run_stage(snakemake, "classify", compute, step="model")  # noqa: F821
