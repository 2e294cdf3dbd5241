"""Rule integrate_vae: a VAE method scored as an integration (vae: the train_vae latent space;
vae_labels: a semi-supervised VAE trained here), and the same VAE trained without one donor
scored on placing it."""

from cellatlas.runner import run_stage


def compute(smk, live):
    import torch

    from cellatlas.integrate.stages import method_stage
    from cellatlas.integrate.vae import vae_heldout, vae_labels

    torch.set_num_threads(smk.threads)
    method, vae, params, seed = smk.wildcards.method, smk.params.vae, smk.params.method, smk.params.seed
    return method_stage(
        h5ad=smk.input.h5ad, dataset=smk.wildcards.dataset, method=method, params=params,
        settings=smk.params.settings, embed=smk.params.embed, seed=seed, latent=smk.input.get("latent"),
        run_method=(lambda adata: vae_labels(adata, vae=vae, params=params, seed=seed)) if method == "vae_labels" else None,
        place_heldout=lambda adata, donor: vae_heldout(adata, donor, method=method, vae=vae, params=params, seed=seed),
    )


if __name__ == "__main__":
    run_stage(snakemake, "integrate", compute, step="method")  # noqa: F821
