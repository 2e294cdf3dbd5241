"""Rule atlas_compare: the methods of one atlas x query side by side."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import compare_stage

    wc = smk.wildcards
    records = {k[len("record_"):]: v for k, v in smk.input.items() if k.startswith("record_")}
    labels = {k[len("labels_"):]: v for k, v in smk.input.items() if k.startswith("labels_")}
    return compare_stage(records=records, labels=labels, atlas=wc.atlas, reference=smk.params.reference,
                         query=wc.dataset)


run_stage(snakemake, "atlas", compute, step="compare", part="comparison")  # noqa: F821
