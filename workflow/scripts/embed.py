"""Rule embed: PCA, kNN graph, UMAP and t-SNE, with figures."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.chain import embed_stage

    return embed_stage(smk.input[0], smk.wildcards.dataset, smk.params.embed, seed=smk.params.seed, threads=smk.threads)


run_stage(snakemake, "embed", compute, step="embed")  # noqa: F821
