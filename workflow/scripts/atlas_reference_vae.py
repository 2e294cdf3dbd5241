"""Rule atlas_reference_vae: the VAE part of the reference map (latent space, graph, label models)."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import reference_vae_job

    reference_vae_job(reference_map=smk.input.reference, vae=smk.input.vae, output=smk.output.h5ad,
                      atlas=smk.wildcards.atlas, reference=smk.params.reference, seed=smk.params.seed, run=run)


run_stage(snakemake, "atlas_reference_vae", body, name=f"atlas_reference_vae:{snakemake.wildcards.atlas}")  # noqa: F821
