"""Rule cluster: Leiden at several resolutions, ARI/NMI against labels, marker genes."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.chain import cluster_stage

    return cluster_stage(smk.input[0], smk.wildcards.dataset, smk.params.cluster, seed=smk.params.seed)


run_stage(snakemake, "cluster", compute, step="cluster")  # noqa: F821
