"""Rule atlas_calibrate: one method's calibration and prediction sets, on held-out reference cells."""

from cellatlas.runner import run_stage


def compute(smk, live):
    from cellatlas.atlas.stages import calibrate_stage

    predictions = {k[len("predictions_"):]: v for k, v in smk.input.items() if k.startswith("predictions_")}
    return calibrate_stage(reference_map=smk.input.get("reference"), atlas=smk.wildcards.atlas,
                           reference=smk.params.reference, method=smk.wildcards.method, alpha=smk.params.alpha,
                           min_confidence=smk.params.min_confidence,
                           novelty_alpha=smk.params.novelty_alpha,
                           n_neighbors=smk.params.n_neighbors, seed=smk.params.seed,
                           reference_vae=smk.input.get("reference_vae"), comparison=smk.input.get("comparison"),
                           predictions=predictions)


run_stage(snakemake, "atlas", compute, step="calibrate", part="calibration")  # noqa: F821
