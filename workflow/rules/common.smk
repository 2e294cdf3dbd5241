# Helpers shared by the stage files: config access, input functions, tracking hooks.
import os
import shutil
import sys
from pathlib import Path

# The library lives beside the scripts; the Snakefile needs it too (config checks, hooks).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))

from cellatlas.config import CALIBRATION_DIR  # noqa: E402
from cellatlas.errors import CellAtlasError, ConfigError  # noqa: E402
from snakemake.exceptions import WorkflowError  # noqa: E402

# conda environments (`--sdm conda`): the scanpy stages need no torch; the supervised, training
# and atlas stages do (tests/test_environment.py checks each covers its rules' imports)
SCANPY_ENV = "../../envs/scanpy.yaml"
LEARN_ENV = "../../envs/learn.yaml"
STAGE_FILES = ("ingest", "qc", "normalize", "embed", "cluster")
PATH_SOURCES = ("10x_mtx", "10x_h5", "h5ad", "csv")


def validate_config(config, schema):
    from cellatlas.config import check_files, validate

    try:
        check_files(workflow.configfiles)
        validate(config, schema)
    except ConfigError as e:
        raise WorkflowError(str(e)) from None


def stage_h5ad(path):
    """A chain stage's AnnData that later stages read: kept, or a temp file (keep_intermediate)."""
    return path if config["keep_intermediate"] else temp(path)


def get_dataset(wildcards):
    return config["datasets"][wildcards.dataset]


def get_source_path(wildcards):
    source = get_dataset(wildcards)["source"]
    if source["kind"] == "url":
        return f"results/downloads/{wildcards.dataset}/{source['filename']}"
    if source["kind"] in PATH_SOURCES:
        path = source["path"]
        if not os.path.exists(path):
            raise WorkflowError(f"dataset '{wildcards.dataset}': source.path '{path}' does not exist")
        return path
    return None


def get_ingest_input(wildcards):
    path = get_source_path(wildcards)
    return {"source": path} if path else {}


def get_download_params(wildcards):
    source = get_dataset(wildcards)["source"]
    return {"url": source["url"], "sha256": source["sha256"]}


def get_tasks():
    """Supervised tasks resolved from the config: {(dataset, task): spec} (see cellatlas.config).

    The config was checked by validate_config; here the tasks are only resolved, which every
    job's input and params functions ask for.
    """
    from cellatlas.config import classify_tasks

    return classify_tasks(config, check_models=False)


def get_task(wildcards):
    spec = get_tasks().get((wildcards.dataset, wildcards.task))
    kind = wildcards.get("kind", spec["dir"] if spec else None)
    if spec is None or spec["dir"] != kind:
        raise WorkflowError(f"dataset '{wildcards.dataset}': no {kind} task '{wildcards.task}' in classify.tasks")
    return spec


def get_task_matrix(wildcards):
    """The matrix a task's models read: an image dataset's images, else the normalized genes."""
    if wildcards.dataset in config["images"]["datasets"]:
        return f"results/{wildcards.dataset}/images.h5ad"
    return f"results/{wildcards.dataset}/normalize.h5ad"


def get_image_dataset(wildcards):
    try:
        return config["images"]["datasets"][wildcards.dataset]
    except KeyError:
        raise WorkflowError(f"'{wildcards.dataset}' is not in images.datasets") from None


def get_image_group_keys(wildcards):
    from cellatlas.config import image_group_keys

    return image_group_keys(get_image_dataset(wildcards))


def get_image_source(wildcards):
    return get_image_dataset(wildcards)["source"]


def get_classify_setting(name):
    """Params function: classify.<name> (features, importance) for an expression task; nothing
    for an image dataset's, whose networks use neither (changing them reruns no image model)."""

    def setting(wildcards):
        return {} if wildcards.dataset in config["images"]["datasets"] else config["classify"][name]

    return setting


def get_image_input(wildcards):
    """The source a job reads (a folder, a table or an archive); a table's images are read through it."""
    source = get_image_dataset(wildcards)["source"]
    return [source["path"]] if "path" in source else []


def get_model_inputs(wildcards):
    """Files a model's params name: an image model's init_weights (a checkpoint another job
    trains, or a user's file), so that it is trained, or tracked, before this model."""
    params = get_model_params(wildcards).get("params") or {}
    return {"init_weights": params["init_weights"]} if params.get("init_weights") else {}


def get_task_params(wildcards):
    spec = get_task(wildcards)
    return {"target": spec["target"], "kind": spec["kind"], "split": spec["split"]}


def get_model_params(wildcards):
    models = get_task(wildcards)["models"]
    if wildcards.model not in models:
        raise WorkflowError(f"dataset '{wildcards.dataset}', task '{wildcards.task}': no model '{wildcards.model}'")
    return models[wildcards.model]


def get_task_model_names(wildcards):
    return sorted(get_task(wildcards)["models"])


def get_task_model_folds(wildcards):
    base = f"results/{wildcards.dataset}/{wildcards.kind}/{wildcards.task}/models"
    return [f"{base}/{m}/folds.tsv" for m in get_task_model_names(wildcards)]


def get_task_model_records(wildcards):
    base = f"results/{wildcards.dataset}/{wildcards.kind}/{wildcards.task}/models"
    return [f"{base}/{m}/run.json" for m in get_task_model_names(wildcards)]


def model_pattern(deep):
    """Wildcard pattern of the configured model names that Lightning trains (deep) or not."""
    import re

    from cellatlas.classify.models import is_deep
    from cellatlas.keys import CLASSIFICATION, REGRESSION

    cl = config["classify"]
    names = [n for n, m in cl["classifiers"].items() if is_deep(m["kind"], CLASSIFICATION) == deep]
    if deep:
        names += list(config["images"]["models"])  # every image model is trained by Lightning
    else:
        names += list(cl["regressors"])
    return "|".join(re.escape(n) for n in sorted(set(names))) or "(?!)"


def get_embedding_datasets():
    from cellatlas.config import embedding_datasets

    return embedding_datasets(config)


def get_integrations():
    """{dataset: methods} of integration (cellatlas.config.integrations)."""
    from cellatlas.config import integrations

    return integrations(config)


def get_integration_params(wildcards):
    """Params function: the one method's params (a change to another method reruns nothing here)."""
    return config["integration"]["params"].get(wildcards.method, {})


def get_integrate_vae_input(wildcards):
    inputs = {"h5ad": f"results/{wildcards.dataset}/embed.h5ad"}
    if wildcards.method == "vae":
        inputs["latent"] = f"results/{wildcards.dataset}/train/vae/latent.h5ad"
    return inputs


def get_integration_settings():
    return {k: config["integration"][k] for k in ("min_batch_cells", "holdout", "holdout_donor")}


def get_integration_method_files(wildcards):
    methods = get_integrations().get(wildcards.dataset)
    if methods is None:
        raise WorkflowError(f"dataset '{wildcards.dataset}' is not integrated (integration.datasets)")
    files = {}
    for m in methods:
        files[f"embedding_{m}"] = f"results/{wildcards.dataset}/integrate/{m}/embedding.h5ad"
        files[f"scores_{m}"] = f"results/{wildcards.dataset}/integrate/{m}/scores.tsv"
    return files


def get_cluster_input(wildcards):
    """The cluster stage reads the integrated graph and maps where the dataset is integrated."""
    if wildcards.dataset in get_integrations():
        return f"results/{wildcards.dataset}/integrate.h5ad"
    return f"results/{wildcards.dataset}/embed.h5ad"


#: a query's folder beside the atlas's calibration/ (cellatlas.config reserves the name)
ATLAS_QUERY = rf"(?!{CALIBRATION_DIR}/)[A-Za-z][A-Za-z0-9_-]*"


def get_atlases():
    from cellatlas.config import atlases

    return atlases(config)


def get_atlas(wildcards):
    spec = get_atlases().get(wildcards.atlas)
    if spec is None:
        raise WorkflowError(f"no atlas '{wildcards.atlas}' in atlas.atlases")
    if "dataset" in wildcards.keys() and wildcards.dataset not in spec["queries"]:
        raise WorkflowError(f"atlas '{wildcards.atlas}': '{wildcards.dataset}' is not one of its queries")
    return spec


def get_atlas_field(name):
    """Params function: one field of the atlas (a job carries only what it uses, so that adding a
    query to an atlas reruns only what reads its queries: the map, on the genes they share)."""

    def field(wildcards):
        return get_atlas(wildcards)[name]

    return field


def get_atlas_correspondence(wildcards):
    """Params function: the query's correspondence table (its labels -> accepted reference labels)."""
    return get_atlas(wildcards)["correspondence"].get(wildcards.dataset, {})


def get_atlas_reference_input(wildcards):
    """The reference's embedding, and its queries' data (the map is on the genes they share)."""
    spec = get_atlas(wildcards)
    return {"embed": f"results/{spec['reference']}/embed.h5ad",
            "queries": [f"results/{q}/normalize.h5ad" for q in spec["queries"]]}


def get_atlas_vae_input(wildcards):
    spec = get_atlas(wildcards)
    if "latent" not in spec["methods"]:
        raise WorkflowError(f"atlas '{wildcards.atlas}': no VAE map without the latent method")
    return f"results/{spec['reference']}/train/vae/embedding.h5ad"


def get_atlas_calibrate_input(wildcards):
    """What a method's calibration reads: the map, and the best classifier's out-of-fold
    predictions (named predictions_<model>; the comparison names the best)."""
    spec = get_atlas(wildcards)
    ref = spec["reference"]
    if wildcards.method not in spec["methods"]:
        raise WorkflowError(f"atlas '{wildcards.atlas}': method '{wildcards.method}' is not in its methods")
    inputs = {"reference": f"results/atlas/{wildcards.atlas}/reference.h5ad"}
    if wildcards.method == "classifier":
        base = f"results/{ref}/classify/{spec['classify_task']}"
        models = get_tasks()[(ref, spec["classify_task"])]["models"]
        inputs["comparison"] = f"{base}/comparison/models.tsv"
        inputs.update({f"predictions_{m}": f"{base}/models/{m}/predictions.tsv.gz" for m in models})
    if wildcards.method == "latent":
        inputs["reference_vae"] = f"results/atlas/{wildcards.atlas}/reference_vae.h5ad"
    return inputs


def get_atlas_map_input(wildcards):
    spec = get_atlas(wildcards)
    ref = spec["reference"]
    calibration = f"results/atlas/{wildcards.atlas}/calibration/{wildcards.method}"
    inputs = {
        "reference": f"results/atlas/{wildcards.atlas}/reference.h5ad",
        "query": f"results/{wildcards.dataset}/normalize.h5ad",
        "heldout": f"{calibration}/heldout.tsv.gz",
        "calibration": f"{calibration}/run.json",
    }
    if wildcards.method not in spec["methods"]:
        raise WorkflowError(f"atlas '{wildcards.atlas}': method '{wildcards.method}' is not in its methods")
    if wildcards.method == "latent":
        inputs["reference_vae"] = f"results/atlas/{wildcards.atlas}/reference_vae.h5ad"
        inputs["vae"] = f"results/{ref}/train/vae/model.ckpt"
    if wildcards.method == "classifier":
        base = f"results/{ref}/classify/{spec['classify_task']}"
        inputs["comparison"] = f"{base}/comparison/models.tsv"
        models = get_tasks()[(ref, spec["classify_task"])]["models"]
        inputs.update({f"model_{m}": f"{base}/models/{m}/model.joblib" for m in models})
    return inputs


def get_atlas_method_files(wildcards):
    """Each method's run record and labels, named record_<method> and labels_<method>."""
    base = f"results/atlas/{wildcards.atlas}/{wildcards.dataset}"
    files = {}
    for m in get_atlas(wildcards)["methods"]:
        files[f"record_{m}"] = f"{base}/{m}/run.json"
        files[f"labels_{m}"] = f"{base}/{m}/labels.tsv.gz"
    return files


def get_atlas_comparisons():
    return [f"results/atlas/{a}/{q}/comparison.tsv" for a, spec in get_atlases().items() for q in spec["queries"]]


def get_vae_datasets():
    """Datasets whose VAE is trained: train.embedding's, and references of latent-method atlases."""
    chosen = list(get_embedding_datasets())
    chosen += [ds for ds, methods in get_integrations().items() if "vae" in methods and ds not in chosen]
    for spec in get_atlases().values():
        if "latent" in spec["methods"] and spec["reference"] not in chosen:
            chosen.append(spec["reference"])
    return chosen


def get_summary_records():
    records = [f"results/{ds}/{stage}/run.json" for ds in config["datasets"] for stage in STAGE_FILES]
    records += [f"results/{ds}/integrate/run.json" for ds in get_integrations()]
    return records + [f"results/{ds}/train/vae/{part}run.json" for ds in get_vae_datasets() for part in ("", "cluster/")]


def get_integration_tables():
    return [f"results/{ds}/integrate/scores.tsv" for ds in get_integrations()]


def get_comparisons():
    return [f"results/{ds}/{spec['dir']}/{task}/comparison/models.tsv" for (ds, task), spec in get_tasks().items()]


def get_final_outputs():
    if not config["datasets"] and not config["images"]["datasets"]:
        return []
    return [
        "results/summary.tsv",
        "results/models.tsv",
        "results/atlas.tsv",
        "results/integration.tsv",
        *get_summary_records(),
        *get_comparisons(),
        *get_atlas_comparisons(),
    ]


def get_train_gpus(wildcards):
    """GPUs a training job asks for: one per device of train.trainer (none when it trains on the CPU).

    Under SLURM this is the job's --gpus. A local run on a machine without an NVIDIA driver asks
    for none (the job trains on the CPU). Evaluated per job, once the executor is known.
    """
    from cellatlas.deep.devices import requested_devices

    trainer = config["train"]["trainer"]
    if trainer["accelerator"] == "cpu":
        return 0
    if not workflow.non_local_exec and shutil.which("nvidia-smi") is None:
        return 0
    return requested_devices(trainer["devices"]) or 1


def get_tracking_uri():
    from cellatlas.tracking import default_uri

    return config["tracking"]["uri"] or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(os.getcwd())


def get_all_records():
    """Every stage run record this config's results come from (the parent's runs.tsv)."""
    records = [*get_summary_records(), "results/summary/run.json"]
    records += [f"results/{ds}/images/run.json" for ds in config["images"]["datasets"]]
    for ds, methods in get_integrations().items():
        records += [f"results/{ds}/integrate/{m}/run.json" for m in methods]
    for (ds, task), spec in get_tasks().items():
        base = f"results/{ds}/{spec['dir']}/{task}"
        records += [f"{base}/split/run.json", f"{base}/comparison/run.json"]
        records += [f"{base}/models/{m}/run.json" for m in sorted(spec["models"])]
    for atlas, spec in get_atlases().items():
        base = f"results/atlas/{atlas}"
        records.append(f"{base}/reference/run.json")
        if "latent" in spec["methods"]:
            records.append(f"{base}/reference_vae/run.json")
        records += [f"{base}/calibration/{m}/run.json" for m in spec["methods"]]
        for q in spec["queries"]:
            records += [f"{base}/{q}/{m}/run.json" for m in spec["methods"]] + [f"{base}/{q}/comparison/run.json"]
    return records


def start_tracking():
    from cellatlas.invocation import start_parent

    # an unreachable server must fail a job in seconds, not after MLflow's ~4 minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    # a progress bar per model read back for its digest would fill the job logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(".snakemake", "numba-cache").resolve()))
    Path("results").mkdir(exist_ok=True)
    from cellatlas.runner import clear_scratch

    clear_scratch()  # what jobs killed outright left behind
    experiment, uri = config["tracking"]["experiment"], get_tracking_uri()
    try:
        if workflow.non_local_exec and uri.startswith("sqlite:"):
            # jobs on many nodes writing one SQLite file on a shared filesystem lock and corrupt it
            raise ConfigError(
                f"tracking.uri: jobs sent to a cluster cannot share the SQLite store {uri}; "
                "start an MLflow server and set tracking.uri (README: Running on a SLURM cluster)"
            )
        from urllib.parse import urlsplit

        host = urlsplit(uri).hostname or ""
        if workflow.non_local_exec and (host in ("localhost", "0.0.0.0", "::1") or host.startswith("127.")):
            print(f"cellatlas warning: tracking.uri {uri} names this host; jobs on other nodes will not reach it",
                  file=sys.stderr)
        start_parent(uri=uri, experiment=experiment, config=config, workdir=os.getcwd())
    except CellAtlasError as e:  # no tracking store the jobs can use: no job starts
        # one line and a failed exit (a WorkflowError raised here trips Snakemake's error formatter)
        print(f"cellatlas error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def end_tracking(status):
    from cellatlas.invocation import end_parent

    end_parent(status, records=get_all_records() if status == "FINISHED" else ())
