"""Rule atlas_reference: gather the reference's fitted map once per atlas."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import reference_stage

    return reference_stage(embed=smk.input[0], atlas=smk.wildcards.atlas, reference=smk.params.reference,
                           label_key=smk.params.label_key, seed=smk.params.seed)


run_stage(snakemake, "atlas", compute, step="reference", part="reference")  # noqa: F821
