"""Rule train_mlp: an mlp model of a classify task, cross-validated on the task's folds with
Lightning (epochs live in MLflow), refitted on all training cells, logged like every model."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.classify.train import train_model

    train_model(
        h5ad=smk.input.h5ad, folds=smk.input.folds, meta=smk.input.meta, outputs=dict(smk.output.items()),
        dataset=smk.wildcards.dataset, task=smk.wildcards.task, model_name=smk.wildcards.model,
        model=smk.params.model, features=smk.params.features, importance=smk.params.importance,
        seed=smk.params.seed, threads=smk.threads, trainer=smk.params.trainer, run=run,
    )


# guarded: data-parallel training spawns workers that import this file again
if __name__ == "__main__":
    run_stage(snakemake, "train", body)  # noqa: F821
