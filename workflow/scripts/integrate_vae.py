"""Rule integrate_vae: the VAE's latent space scored as an integration, and a VAE trained
without one donor scored on placing it."""

from cellatlas.runner import run_stage


def compute(smk, live):
    import torch

    from cellatlas.integrate.stages import method_stage
    from cellatlas.integrate.vae import vae_heldout

    torch.set_num_threads(smk.threads)
    return method_stage(h5ad=smk.input.h5ad, dataset=smk.wildcards.dataset, method="vae", params={},
                        settings=smk.params.settings, embed=smk.params.embed, seed=smk.params.seed,
                        latent=smk.input.latent,
                        place_heldout=lambda adata, donor: vae_heldout(adata, donor, vae=smk.params.vae,
                                                                       seed=smk.params.seed))


if __name__ == "__main__":
    run_stage(snakemake, "integrate", compute, step="method")  # noqa: F821
