rule download:
    output:
        "results/downloads/{dataset}/{filename}",
    params:
        source=get_download_params,
    log:
        "results/{dataset}/logs/download_{filename}.log",
    conda:
        SCANPY_ENV
    script:
        "../scripts/download.py"


rule ingest:
    input:
        unpack(get_ingest_input),
    output:
        h5ad=stage_h5ad("results/{dataset}/ingest.h5ad"),
        run="results/{dataset}/ingest/run.json",
    params:
        dataset=get_dataset,
    log:
        "results/{dataset}/logs/ingest.log",
    benchmark:
        "results/{dataset}/benchmarks/ingest.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/ingest.py"
