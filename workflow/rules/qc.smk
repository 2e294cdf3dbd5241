rule qc:
    input:
        "results/{dataset}/ingest.h5ad",
    output:
        h5ad=stage_h5ad("results/{dataset}/qc.h5ad"),
        thresholds="results/{dataset}/qc/thresholds.tsv",
        cells="results/{dataset}/qc/cells.tsv.gz",
        removed="results/{dataset}/qc/removed.tsv",
        histograms=report(
            "results/{dataset}/qc/histograms.png", category="QC", subcategory="{dataset}",
            caption="../report/qc_histograms.rst",
        ),
        scatter=report("results/{dataset}/qc/scatter.png", caption="../report/qc_scatter.rst", category="QC", subcategory="{dataset}"),
        run="results/{dataset}/qc/run.json",
    params:
        qc=config["qc"],
        seed=config["seed"],
    log:
        "results/{dataset}/logs/qc.log",
    benchmark:
        "results/{dataset}/benchmarks/qc.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/qc.py"
