"""Rule image_ingest: read (or simulate) an image dataset into the pipeline's container."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.images.stage import ingest_images_stage

    return ingest_images_stage(smk.wildcards.dataset, smk.params.source, group_keys=smk.params.group_keys,
                               seed=smk.params.seed)


run_stage(snakemake, "images", compute, step="ingest")  # noqa: F821
