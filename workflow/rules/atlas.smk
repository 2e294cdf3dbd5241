# Atlas mapping. A reference's fitted stages (PCA, UMAP, graph, VAE, best classifier) are gathered
# once per atlas into a reference map; each query is placed on it and labelled by every method,
# then the methods are compared. Mapping a new query reruns none of the reference's stages.


rule atlas_reference:
    input:
        unpack(get_atlas_reference_input),
    output:
        h5ad="results/atlas/{atlas}/reference.h5ad",
        umap=report("results/atlas/{atlas}/reference/umap.png", category="Atlas", subcategory="{atlas}"),
        run="results/atlas/{atlas}/reference/run.json",
    params:
        atlas=get_atlas,
        seed=config["seed"],
    log:
        "results/atlas/{atlas}/logs/reference.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/reference.tsv"
    conda:
        PIPELINE_ENV
    script:
        "../scripts/atlas_reference.py"


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
            category="Atlas",
            subcategory="{atlas} {dataset}",
        ),
        umap=report(
            "results/atlas/{atlas}/{dataset}/{method}/umap.png", category="Atlas", subcategory="{atlas} {dataset}"
        ),
        run="results/atlas/{atlas}/{dataset}/{method}/run.json",
    wildcard_constraints:
        method="projection|latent|classifier",
    params:
        atlas=get_atlas,
        mapping={k: v for k, v in config["atlas"].items() if k != "atlases"},
        seed=config["seed"],
    threads: 2
    log:
        "results/atlas/{atlas}/logs/{dataset}/{method}.log",
    benchmark:
        "results/atlas/{atlas}/benchmarks/{dataset}/{method}.tsv"
    conda:
        PIPELINE_ENV
    script:
        "../scripts/atlas_map.py"


rule atlas_compare:
    input:
        records=get_atlas_method_files("run.json"),
        labels=get_atlas_method_files("labels.tsv.gz"),
    output:
        table="results/atlas/{atlas}/{dataset}/comparison.tsv",
        agreement="results/atlas/{atlas}/{dataset}/agreement.tsv",
        run="results/atlas/{atlas}/{dataset}/comparison/run.json",
    params:
        atlas=get_atlas,
    log:
        "results/atlas/{atlas}/logs/{dataset}/comparison.log",
    conda:
        PIPELINE_ENV
    script:
        "../scripts/atlas_compare.py"
