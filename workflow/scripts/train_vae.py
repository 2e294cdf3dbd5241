"""Rule train_vae: a negative-binomial VAE on the dataset's counts (epochs live in MLflow), its
latent space clustered and mapped with UMAP, and its clusters compared with the PCA ones."""

from cellatlas.runner import run_stage


def body(smk, run):
    import torch

    from cellatlas.deep.embedding import embedding_job

    torch.set_num_threads(smk.threads)
    embedding_job(
        h5ad=smk.input[0], outputs=dict(smk.output.items()), dataset=smk.wildcards.dataset,
        model=smk.params.model, trainer=smk.params.trainer, embed=smk.params.embed, cluster=smk.params.cluster,
        seed=smk.params.seed, run=run,
    )


# guarded: data-parallel training spawns workers that import this file again
if __name__ == "__main__":
    run_stage(snakemake, "train", body, part="vae")  # noqa: F821
