rule cluster:
    input:
        get_cluster_input,
    output:
        h5ad="results/{dataset}/cluster.h5ad",
        agreement="results/{dataset}/cluster/agreement.tsv",
        markers="results/{dataset}/cluster/markers.tsv",
        umap=report("results/{dataset}/cluster/umap_leiden.png", caption="../report/leiden.rst", category="Clusters", subcategory="{dataset}"),
        dotplot=report("results/{dataset}/cluster/markers.png", caption="../report/markers.rst", category="Clusters", subcategory="{dataset}"),
        run="results/{dataset}/cluster/run.json",
    params:
        cluster=config["cluster"],
        seed=config["seed"],
    log:
        "results/{dataset}/logs/cluster.log",
    benchmark:
        "results/{dataset}/benchmarks/cluster.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/cluster.py"
