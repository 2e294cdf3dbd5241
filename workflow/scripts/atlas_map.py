"""Rule atlas_map: one query onto one atlas by one method."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import map_stage

    wc = smk.wildcards
    models = {k[len("model_"):]: v for k, v in smk.input.items() if k.startswith("model_")}
    return map_stage(reference_map=smk.input.reference, query_h5ad=smk.input.query, atlas=wc.atlas,
                     reference=smk.params.reference, query=wc.dataset, method=wc.method, mapping=smk.params.mapping,
                     heldout=smk.input.heldout, calibration=smk.input.calibration,
                     correspondence=smk.params.correspondence, seed=smk.params.seed,
                     reference_vae=smk.input.get("reference_vae"),
                     vae_checkpoint=smk.input.get("vae"), comparison=smk.input.get("comparison"), models=models)


run_stage(snakemake, "atlas", compute, step="map")  # noqa: F821
