"""Rule atlas_map: one query onto one atlas by one method."""

from cellatlas.runner import run_stage


def body(smk, run):
    from cellatlas.atlas import map_job

    wc = smk.wildcards
    models = {k[len("model_"):]: v for k, v in smk.input.items() if k.startswith("model_")}
    map_job(reference_map=smk.input.reference, query_h5ad=smk.input.query, outputs=smk.output, atlas=wc.atlas,
            reference=smk.params.reference, query=wc.dataset, method=wc.method, mapping=smk.params.mapping,
            seed=smk.params.seed, reference_vae=smk.input.get("reference_vae"), vae_checkpoint=smk.input.get("vae"),
            comparison=smk.input.get("comparison"), models=models, run=run)


wc = snakemake.wildcards  # noqa: F821
run_stage(snakemake, "atlas", body, name=f"atlas:{wc.atlas}/{wc.dataset}/{wc.method}")  # noqa: F821
