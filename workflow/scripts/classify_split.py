"""Rule classify_split: check a task's target and fix its folds, shared by every model."""

from cellatlas.runner import run_stage


def body(smk, run):
    import anndata as ad

    from cellatlas.classify.splits import make_folds

    p = smk.params.task
    obs = ad.read_h5ad(smk.input[0], backed="r").obs  # obs only: the matrix is not needed here
    split = p["split"]
    folds = make_folds(
        obs, dataset=smk.wildcards.dataset, task=smk.wildcards.task, target=p["target"], kind=p["kind"],
        scheme=split["scheme"], n_splits=split["n_splits"], group_key=split["group_key"],
        train_batches=split["train_batches"], test_batches=split["test_batches"], seed=smk.params.seed,
    )
    folds.write(smk.output.folds, smk.output.meta)
    summary = folds.summary()
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    run.log_artifact(smk.output.meta)


run_stage(snakemake, "classify_split", body)  # noqa: F821
