rule normalize:
    input:
        "results/{dataset}/qc.h5ad",
    output:
        h5ad=stage_h5ad("results/{dataset}/normalize.h5ad"),
        hvg="results/{dataset}/normalize/hvg.tsv",
        figure=report(
            "results/{dataset}/normalize/hvg.png", category="Normalization", subcategory="{dataset}",
            caption="../report/hvg.rst",
        ),
        run="results/{dataset}/normalize/run.json",
    params:
        normalize=config["normalize"],
    log:
        "results/{dataset}/logs/normalize.log",
    benchmark:
        "results/{dataset}/benchmarks/normalize.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/normalize.py"
