"""Rule integrate_compare: the integration methods side by side, the choice, and the graph,
UMAP and t-SNE remade on the chosen one for the cluster stage."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.integrate.stages import compare_stage

    methods = [k[len("scores_"):] for k in smk.input.keys() if k.startswith("scores_")]
    return compare_stage(h5ad=smk.input.h5ad, dataset=smk.wildcards.dataset,
                         embeddings={m: smk.input[f"embedding_{m}"] for m in methods},
                         scores=[smk.input[f"scores_{m}"] for m in methods], use=smk.params.use,
                         max_bio_loss=smk.params.max_bio_loss, embed=smk.params.embed, seed=smk.params.seed,
                         threads=smk.threads)


run_stage(snakemake, "integrate", compute, step="compare")  # noqa: F821
