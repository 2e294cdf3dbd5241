# Image datasets: read (or simulated) once into the container the classify stage reads; their
# task 'label' then runs through the classify rules (folds, image models, comparison).


rule image_ingest:
    input:
        get_image_input,
    output:
        h5ad="results/{dataset}/images.h5ad",
        montage=report("results/{dataset}/images/montage.png", caption="../report/image_montage.rst", category="Images", subcategory="{dataset}"),
        classes="results/{dataset}/images/classes.tsv",
        run="results/{dataset}/images/run.json",
    params:
        source=get_image_source,
        group_keys=get_image_group_keys,
        seed=config["seed"],
    log:
        "results/{dataset}/logs/images.log",
    benchmark:
        "results/{dataset}/benchmarks/images.tsv"
    conda:
        LEARN_ENV
    script:
        "../scripts/image_ingest.py"
