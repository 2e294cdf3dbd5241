# Batch integration between embed and cluster, for datasets with batches: every method of
# integration.methods in its own job (integrated and scored with scIB's metrics, so a change to
# one method's params reruns that method only), then one job that compares them, picks one
# (integration.use) and remakes the kNN graph, UMAP and t-SNE on it for the cluster stage.


rule integrate:
    input:
        "results/{dataset}/embed.h5ad",
    output:
        embedding="results/{dataset}/integrate/{method}/embedding.h5ad",
        scores="results/{dataset}/integrate/{method}/scores.tsv",
        run="results/{dataset}/integrate/{method}/run.json",
    wildcard_constraints:
        method="pca|combat|harmony|bbknn",
    params:
        method=get_integration_params,
        settings=get_integration_settings(),
        embed={k: config["embed"][k] for k in ("n_pcs", "scale", "n_neighbors")},
        seed=config["seed"],
    threads: 2
    log:
        "results/{dataset}/logs/integrate/{method}.log",
    benchmark:
        "results/{dataset}/benchmarks/integrate/{method}.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/integrate.py"


# vae: the codes come from train_vae; vae_labels (the VAE that also learns the labels) trains
# here. Both train a second VAE without the held-out donor, so the job asks for a GPU like the
# other training jobs.
rule integrate_vae:
    input:
        unpack(get_integrate_vae_input),
    output:
        embedding="results/{dataset}/integrate/{method}/embedding.h5ad",
        scores="results/{dataset}/integrate/{method}/scores.tsv",
        run="results/{dataset}/integrate/{method}/run.json",
    wildcard_constraints:
        method="vae|vae_labels",
    params:
        method=get_integration_params,
        settings=get_integration_settings(),
        embed={k: config["embed"][k] for k in ("n_pcs", "scale", "n_neighbors")},
        vae={"model": config["train"]["embedding"], "trainer": config["train"]["trainer"]},
        seed=config["seed"],
    threads: 4
    resources:
        gpu=get_train_gpus,
    log:
        "results/{dataset}/logs/integrate/{method}.log",
    benchmark:
        "results/{dataset}/benchmarks/integrate/{method}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/integrate_vae.py"


rule integrate_compare:
    input:
        unpack(get_integration_method_files),
        h5ad="results/{dataset}/embed.h5ad",
    output:
        h5ad=stage_h5ad("results/{dataset}/integrate.h5ad"),
        table="results/{dataset}/integrate/scores.tsv",
        choice="results/{dataset}/integrate/choice.json",
        figure=report(
            "results/{dataset}/integrate/scores.png", caption="../report/integration.rst", category="Integration",
            subcategory="{dataset}",
        ),
        umap=report("results/{dataset}/integrate/umap.png", caption="../report/integration_umap.rst", category="Integration", subcategory="{dataset}"),
        tsne=report("results/{dataset}/integrate/tsne.png", caption="../report/integration_umap.rst", category="Integration", subcategory="{dataset}"),
        run="results/{dataset}/integrate/run.json",
    params:
        use=config["integration"]["use"],
        max_bio_loss=config["integration"]["max_bio_loss"],
        embed={k: config["embed"][k] for k in ("n_neighbors", "umap_min_dist", "tsne_perplexity")},
        seed=config["seed"],
    threads: 2
    log:
        "results/{dataset}/logs/integrate/compare.log",
    benchmark:
        "results/{dataset}/benchmarks/integrate/compare.tsv"
    conda:
        SCANPY_ENV
    script:
        "../scripts/integrate_compare.py"
