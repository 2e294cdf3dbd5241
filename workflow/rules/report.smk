rule summary:
    input:
        records=expand(
            "results/{dataset}/{stage}/run.json", dataset=list(config["datasets"]), stage=STAGE_FILES
        ),
        comparisons=get_comparisons(),
    output:
        table=report("results/summary.tsv", category="Summary"),
        models=report("results/models.tsv", category="Summary"),
        run="results/summary/run.json",
    log:
        "results/logs/summary.log",
    conda:
        PIPELINE_ENV
    script:
        "../scripts/summary.py"
