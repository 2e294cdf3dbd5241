"""Rule integrate: one integration method on the embed stage's output, scored with scIB's metrics."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.integrate.stages import method_stage

    return method_stage(h5ad=smk.input[0], dataset=smk.wildcards.dataset, method=smk.wildcards.method,
                        params=smk.params.method, settings=smk.params.settings, embed=smk.params.embed,
                        seed=smk.params.seed)


run_stage(snakemake, "integrate", compute, step="method")  # noqa: F821
