"""Rule atlas_reference: gather the reference's fitted map once per atlas."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import reference_job

    reference_job(embed=smk.input[0], outputs=smk.output, atlas=smk.wildcards.atlas, reference=smk.params.reference,
                  label_key=smk.params.label_key, seed=smk.params.seed, run=run)


run_stage(snakemake, "atlas_reference", body, name=f"atlas_reference:{snakemake.wildcards.atlas}")  # noqa: F821
