"""Rule ingest: read the dataset's source into the canonical AnnData."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.chain import ingest_stage

    return ingest_stage(smk.wildcards.dataset, smk.params.dataset, path=smk.input.get("source"))


run_stage(snakemake, "ingest", compute, step="ingest")  # noqa: F821
