"""Rule atlas_reference: gather the reference's fitted map once per atlas."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import reference_stage

    return reference_stage(embed=smk.input.embed, atlas=smk.wildcards.atlas, reference=smk.params.reference,
                           label_key=smk.params.label_key, seed=smk.params.seed,
                           queries=dict(zip(smk.params.queries, smk.input.queries)),
                           min_shared_genes=smk.params.min_shared_genes)


run_stage(snakemake, "atlas", compute, step="reference", part="reference")  # noqa: F821
