rule summary:
    input:
        records=get_summary_records(),
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
