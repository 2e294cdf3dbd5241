"""Rule atlas_reference: gather the reference's fitted map once per atlas."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import reference_job

    spec = smk.params.atlas
    reference_job(embed=smk.input.embed, vae=smk.input.get("vae"), outputs=smk.output, atlas=smk.wildcards.atlas,
                  reference=spec["reference"], label_key=spec["label_key"], seed=smk.params.seed, run=run)


run_stage(snakemake, "atlas_reference", body, name=f"atlas_reference:{snakemake.wildcards.atlas}")  # noqa: F821
