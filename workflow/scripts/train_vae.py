"""Rule train_vae: a negative-binomial VAE on the dataset's counts (its curves live in MLflow);
every cell encoded into its latent space."""

from cellatlas.runner import run_stage


def compute(smk, live):
    import torch

    from cellatlas.deep.embedding import train_stage

    torch.set_num_threads(smk.threads)
    return train_stage(h5ad=smk.input[0], dataset=smk.wildcards.dataset, model=smk.params.model,
                       trainer=smk.params.trainer, seed=smk.params.seed, tracking=live.tracking, workspace=live.workspace)


# guarded: data-parallel training spawns workers that import this file again
if __name__ == "__main__":
    run_stage(snakemake, "train", compute, step="vae", part="vae")  # noqa: F821
