# Supervised models per task (dataset x target): folds fixed once, one job per model, then a
# paired comparison. Classification lives under classify/, regression under regress/.


rule classify_split:
    input:
        get_task_matrix,
    output:
        folds="results/{dataset}/{kind}/{task}/folds.tsv.gz",
        meta="results/{dataset}/{kind}/{task}/task.json",
        run="results/{dataset}/{kind}/{task}/split/run.json",
    wildcard_constraints:
        kind="classify|regress",
    params:
        task=get_task_params,
        seed=config["seed"],
    log:
        "results/{dataset}/logs/{kind}/{task}/split.log",
    benchmark:
        "results/{dataset}/benchmarks/{kind}/{task}/split.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/classify_split.py"


rule classify_model:
    input:
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
        run="results/{dataset}/classify/{task}/models/{model}/run.json",
    wildcard_constraints:
        model=model_pattern(deep=False),
    params:
        model=get_model_params,
        features=config["classify"]["features"],
        importance=config["classify"]["importance"],
        seed=config["seed"],
    threads: 4
    log:
        "results/{dataset}/logs/classify/{task}/{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/classify/{task}/{model}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/classify_model.py"


rule regress_model:
    input:
        h5ad=get_task_matrix,
        folds="results/{dataset}/regress/{task}/folds.tsv.gz",
        meta="results/{dataset}/regress/{task}/task.json",
    output:
        folds="results/{dataset}/regress/{task}/models/{model}/folds.tsv",
        figure=report(
            "results/{dataset}/regress/{task}/models/{model}/predicted.png",
            caption="../report/predicted.rst",
            category="Regressors",
            subcategory="{dataset} {task}",
        ),
        predictions="results/{dataset}/regress/{task}/models/{model}/predictions.tsv.gz",
        importance="results/{dataset}/regress/{task}/models/{model}/importance.tsv",
        model="results/{dataset}/regress/{task}/models/{model}/model.joblib",
        run="results/{dataset}/regress/{task}/models/{model}/run.json",
    params:
        model=get_model_params,
        features=config["classify"]["features"],
        importance=config["classify"]["importance"],
        seed=config["seed"],
    threads: 4
    log:
        "results/{dataset}/logs/regress/{task}/{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/regress/{task}/{model}.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/classify_model.py"


rule classify_compare:
    input:
        folds=get_task_model_folds,
        records=get_task_model_records,
        meta="results/{dataset}/{kind}/{task}/task.json",
    output:
        table="results/{dataset}/{kind}/{task}/comparison/models.tsv",
        pairwise="results/{dataset}/{kind}/{task}/comparison/pairwise.tsv",
        figure=report(
            "results/{dataset}/{kind}/{task}/comparison/scores.png",
            caption="../report/scores.rst",
            category="Model comparison",
            subcategory="{dataset} {task}",
        ),
        run="results/{dataset}/{kind}/{task}/comparison/run.json",
    wildcard_constraints:
        kind="classify|regress",
    params:
        comparison=config["classify"]["comparison"],
        models=get_task_model_names,
    log:
        "results/{dataset}/logs/{kind}/{task}/comparison.log",
    conda:
        LEARN_ENV
    script:
        "../scripts/classify_compare.py"
