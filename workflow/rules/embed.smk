rule embed:
    input:
        "results/{dataset}/normalize.h5ad",
    output:
        h5ad=stage_h5ad("results/{dataset}/embed.h5ad"),
        pca=report(
            "results/{dataset}/embed/pca_variance.png", category="Embeddings", subcategory="{dataset}",
            caption="../report/pca_variance.rst",
        ),
        umap=report("results/{dataset}/embed/umap.png", caption="../report/umap.rst", category="Embeddings", subcategory="{dataset}"),
        tsne=report("results/{dataset}/embed/tsne.png", caption="../report/tsne.rst", category="Embeddings", subcategory="{dataset}"),
        run="results/{dataset}/embed/run.json",
    params:
        embed=config["embed"],
        seed=config["seed"],
    threads: 2
    log:
        "results/{dataset}/logs/embed.log",
    benchmark:
        "results/{dataset}/benchmarks/embed.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/embed.py"
