"""Rule cluster_vae: the VAE's latent space clustered and mapped like the PCA embedding, and
the two embeddings' clusters compared with the labels (a resolution change reruns only this)."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.deep.embedding import cluster_stage

    return cluster_stage(latent=smk.input.latent, clustered=smk.input.clustered, dataset=smk.wildcards.dataset,
                         embed=smk.params.embed, cluster=smk.params.cluster, seed=smk.params.seed)


run_stage(snakemake, "train", compute, step="cluster", part="vae/cluster")  # noqa: F821
