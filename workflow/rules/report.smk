# The summary across datasets, models and atlases: TSV tables (with run ids and config hash) for
# reading and scripts, the same as HTML for the report, and the software versions behind them.


rule summary:
    input:
        records=get_summary_records(),
        comparisons=get_comparisons(),
        atlases=get_atlas_comparisons(),
        integrations=get_integration_tables(),
    output:
        table="results/summary.tsv",
        models="results/models.tsv",
        atlases="results/atlas.tsv",
        integrations="results/integration.tsv",
        table_html=report("results/report/summary.html", caption="../report/summary_table.rst", category="Summary"),
        models_html=report("results/report/models.html", caption="../report/models_table.rst", category="Summary"),
        atlases_html=report("results/report/atlas.html", caption="../report/atlas_table.rst", category="Summary"),
        integrations_html=report("results/report/integration.html", caption="../report/integration_table.rst", category="Summary"),
        versions=report("results/report/versions.html", caption="../report/versions.rst", category="Software versions"),
        run="results/summary/run.json",
    log:
        "results/logs/summary.log",
    conda:
        SCANPY_ENV
    script:
        "../scripts/summary.py"
