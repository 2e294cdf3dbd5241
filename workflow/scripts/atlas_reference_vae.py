"""Rule atlas_reference_vae: the VAE part of the reference map (latent space, graph, label models)."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import reference_vae_stage

    return reference_vae_stage(reference_map=smk.input.reference, vae=smk.input.vae, atlas=smk.wildcards.atlas,
                               reference=smk.params.reference, seed=smk.params.seed)


run_stage(snakemake, "atlas", compute, step="reference_vae", part="reference/vae")  # noqa: F821
