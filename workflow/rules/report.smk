rule summary:
    input:
        records=get_summary_records(),
        comparisons=get_comparisons(),
        atlases=get_atlas_comparisons(),
    output:
        table=report("results/summary.tsv", category="Summary"),
        models=report("results/models.tsv", category="Summary"),
        atlases=report("results/atlas.tsv", category="Summary"),
        run="results/summary/run.json",
    log:
        "results/logs/summary.log",
    conda:
        SCANPY_ENV
    script:
        "../scripts/summary.py"
