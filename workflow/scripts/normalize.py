"""Rule normalize: total-count + log1p (counts kept in a layer), highly variable genes."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.chain import normalize_stage

    return normalize_stage(smk.input[0], smk.wildcards.dataset, smk.params.normalize)


run_stage(snakemake, "normalize", compute, step="normalize")  # noqa: F821
