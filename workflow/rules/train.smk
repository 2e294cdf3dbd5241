# Lightning models. An mlp is one more model of a classify task: same folds, same metrics, same
# comparison table as the scikit-learn models, but trained by Lightning and allowed a GPU; so is
# a cnn of an image dataset's task (images.models), which this rule trains too. The VAE learns an
# embedding of a dataset's counts, clustered and compared with the PCA one.
# Both ask for one GPU per train.trainer device: under the SLURM profile that sends them to a GPU
# partition; a local run asks for none where there is no NVIDIA driver, and Lightning takes what is there.


rule train_mlp:
    input:
        unpack(get_model_inputs),
        h5ad=get_task_matrix,
        folds="results/{dataset}/classify/{task}/folds.tsv.gz",
        meta="results/{dataset}/classify/{task}/task.json",
    output:
        folds="results/{dataset}/classify/{task}/models/{model}/folds.tsv",
        per_class="results/{dataset}/classify/{task}/models/{model}/per_class.tsv",
        confusion="results/{dataset}/classify/{task}/models/{model}/confusion.tsv",
        figure=report(
            "results/{dataset}/classify/{task}/models/{model}/confusion.png",
            caption="../report/confusion.rst",
            category="Classifiers",
            subcategory="{dataset} {task}",
        ),
        predictions="results/{dataset}/classify/{task}/models/{model}/predictions.tsv.gz",
        importance="results/{dataset}/classify/{task}/models/{model}/importance.tsv",
        model="results/{dataset}/classify/{task}/models/{model}/model.joblib",
        checkpoint="results/{dataset}/classify/{task}/models/{model}/model.ckpt",
        run="results/{dataset}/classify/{task}/models/{model}/run.json",
    wildcard_constraints:
        model=model_pattern(deep=True),
    params:
        model=get_model_params,
        features=get_classify_setting("features"),
        importance=get_classify_setting("importance"),
        trainer=config["train"]["trainer"],
        seed=config["seed"],
    threads: 4
    resources:
        gpu=get_train_gpus,
    log:
        "results/{dataset}/logs/classify/{task}/{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/classify/{task}/{model}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/train_mlp.py"


rule train_vae:
    input:
        "results/{dataset}/normalize.h5ad",
    output:
        latent="results/{dataset}/train/vae/latent.h5ad",
        history="results/{dataset}/train/vae/history.tsv",
        curves=report(
            "results/{dataset}/train/vae/curves.png",
            caption="../report/vae_curves.rst",
            category="Training",
            subcategory="{dataset}",
        ),
        checkpoint="results/{dataset}/train/vae/model.ckpt",
        run="results/{dataset}/train/vae/run.json",
    params:
        model=config["train"]["embedding"],
        trainer=config["train"]["trainer"],
        seed=config["seed"],
    threads: 4
    resources:
        gpu=get_train_gpus,
    log:
        "results/{dataset}/logs/train_vae.log",
    benchmark:
        "results/{dataset}/benchmarks/train_vae.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/train_vae.py"


# Clustering the latent space is its own cheap job: a Leiden resolution change never retrains.
rule cluster_vae:
    input:
        latent="results/{dataset}/train/vae/latent.h5ad",
        clustered="results/{dataset}/cluster.h5ad",
    output:
        h5ad="results/{dataset}/train/vae/embedding.h5ad",
        clusters="results/{dataset}/train/vae/clusters.tsv",
        umap=report(
            "results/{dataset}/train/vae/umap.png",
            caption="../report/vae_umap.rst",
            category="Training",
            subcategory="{dataset}",
        ),
        run="results/{dataset}/train/vae/cluster/run.json",
    params:
        embed={k: config["embed"][k] for k in ("n_neighbors", "umap_min_dist")},
        cluster=config["cluster"],
        seed=config["seed"],
    log:
        "results/{dataset}/logs/cluster_vae.log",
    benchmark:
        "results/{dataset}/benchmarks/cluster_vae.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/cluster_vae.py"
