# Atlas mapping. A reference's fitted stages (PCA, UMAP, graph; the VAE; the best classifier) are
# gathered once per atlas into a reference map; each method is calibrated once on the reference
# cells it did not see; each query is placed on the map and labelled by every method, then the
# methods are compared. Jobs carry only the atlas fields they use, so adding a query reruns nothing
# of the reference, of the calibrations or of the other queries.


rule atlas_reference:
    input:
        unpack(get_atlas_reference_input),
    output:
        h5ad="results/atlas/{atlas}/reference.h5ad",
        umap=report("results/atlas/{atlas}/reference/umap.png", caption="../report/atlas_reference.rst", category="Atlas", subcategory="{atlas}"),
        run="results/atlas/{atlas}/reference/run.json",
    params:
        reference=get_atlas_field("reference"),
        label_key=get_atlas_field("label_key"),
        queries=get_atlas_field("queries"),
        min_shared_genes=config["atlas"]["min_shared_genes"],
        seed=config["seed"],
    log:
        "results/atlas/{atlas}/logs/reference.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/reference.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/atlas_reference.py"


rule atlas_reference_vae:
    input:
        reference="results/atlas/{atlas}/reference.h5ad",
        vae=get_atlas_vae_input,
    output:
        h5ad="results/atlas/{atlas}/reference_vae.h5ad",
        run="results/atlas/{atlas}/reference_vae/run.json",
    params:
        reference=get_atlas_field("reference"),
        seed=config["seed"],
    log:
        "results/atlas/{atlas}/logs/reference_vae.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/reference_vae.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/atlas_reference_vae.py"


rule atlas_calibrate:
    input:
        unpack(get_atlas_calibrate_input),
    output:
        heldout="results/atlas/{atlas}/calibration/{method}/heldout.tsv.gz",
        reliability="results/atlas/{atlas}/calibration/{method}/reliability.tsv",
        coverage="results/atlas/{atlas}/calibration/{method}/coverage.tsv",
        novel="results/atlas/{atlas}/calibration/{method}/novel.tsv",
        figure=report(
            "results/atlas/{atlas}/calibration/{method}/reliability.png",
            caption="../report/atlas_calibration.rst",
            category="Atlas",
            subcategory="{atlas}",
        ),
        run="results/atlas/{atlas}/calibration/{method}/run.json",
    wildcard_constraints:
        method="projection|latent|classifier",
    params:
        reference=get_atlas_field("reference"),
        alpha=config["atlas"]["alpha"],
        min_confidence=config["atlas"]["min_confidence"],
        novelty_alpha=config["atlas"]["novelty_alpha"],
        n_neighbors=config["atlas"]["n_neighbors"],
        seed=config["seed"],
    log:
        "results/atlas/{atlas}/logs/calibration/{method}.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/calibration/{method}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/atlas_calibrate.py"


rule atlas_map:
    input:
        unpack(get_atlas_map_input),
    output:
        h5ad="results/atlas/{atlas}/{dataset}/{method}/mapped.h5ad",
        labels="results/atlas/{atlas}/{dataset}/{method}/labels.tsv.gz",
        per_label="results/atlas/{atlas}/{dataset}/{method}/per_label.tsv",
        crosstab="results/atlas/{atlas}/{dataset}/{method}/crosstab.tsv",
        crosstab_png=report(
            "results/atlas/{atlas}/{dataset}/{method}/crosstab.png",
            caption="../report/atlas_crosstab.rst",
            category="Atlas",
            subcategory="{atlas} {dataset}",
        ),
        umap=report(
            "results/atlas/{atlas}/{dataset}/{method}/umap.png", category="Atlas", subcategory="{atlas} {dataset}",
            caption="../report/atlas_umap.rst",
        ),
        run="results/atlas/{atlas}/{dataset}/{method}/run.json",
    wildcard_constraints:
        method="projection|latent|classifier",
        dataset=ATLAS_QUERY,
    params:
        reference=get_atlas_field("reference"),
        mapping={k: v for k, v in config["atlas"].items() if k != "atlases"},
        correspondence=get_atlas_correspondence,
        seed=config["seed"],
    threads: 2
    log:
        "results/atlas/{atlas}/logs/{dataset}/{method}.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/{dataset}/{method}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/atlas_map.py"


rule atlas_compare:
    input:
        unpack(get_atlas_method_files),
    wildcard_constraints:
        dataset=ATLAS_QUERY,
    output:
        table="results/atlas/{atlas}/{dataset}/comparison.tsv",
        agreement="results/atlas/{atlas}/{dataset}/agreement.tsv",
        run="results/atlas/{atlas}/{dataset}/comparison/run.json",
    params:
        reference=get_atlas_field("reference"),
    log:
        "results/atlas/{atlas}/logs/{dataset}/comparison.log",
    conda:
        LEARN_ENV
    script:
        "../scripts/atlas_compare.py"
