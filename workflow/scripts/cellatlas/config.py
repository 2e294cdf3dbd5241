"""Configuration: validation against the JSON schema (YAML), defaults, one-line errors."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cellatlas.errors import ConfigError


def _with_defaults(validator_class):
    """A validator that fills ``default`` values in while it validates (jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


#: the workflow's schema: config/schema next to workflow/scripts/cellatlas
SCHEMA = Path(__file__).resolve().parents[3] / "config" / "schema" / "config.schema.yaml"


def schema_defaults(*keys: str, schema: str | Path = SCHEMA) -> dict[str, Any]:
    """The schema's defaults of the object at ``keys`` (e.g. ``"train", "embedding"``), so that
    library callers who pass a partial block get what the workflow would have filled in. One
    level only: a nested object's default is returned as written, not filled in further."""
    node = yaml.safe_load(Path(schema).read_text())
    for key in keys:
        node = node["properties"][key]
    return {name: copy.deepcopy(sub["default"]) for name, sub in node.get("properties", {}).items() if "default" in sub}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config file '{Path(self.name)}', line {key_node.start_mark.line + 1}: key "
                                  f"'{key}' is given twice (first on line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def check_files(paths) -> None:
    """Raise :class:`ConfigError` for a config file with a key given twice (Snakemake reads the
    files itself; this reads them again only to refuse what its reader lets through)."""
    for path in paths:
        with open(path) as fh:
            loader = _UniqueKeyLoader(fh)
            loader.name = str(path)
            try:
                loader.get_single_data()
            except yaml.YAMLError:
                pass  # Snakemake has already reported what it could not parse
            finally:
                loader.dispose()


def _path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _message(error) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key(s)")
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    return error.message


def validate(config: dict[str, Any], schema: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Validate ``config`` in place, filling in the schema's defaults.

    Raises
    ------
    ConfigError
        One line: ``config key 'qc.mode': 'fancy' is not one of ['fixed', 'mad']``.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(schema, Mapping):
        schema = yaml.safe_load(Path(schema).read_text())
    validator = _with_defaults(Draft202012Validator)(schema)
    error = best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{_path(error)}': {_message(error)}")
    _check_cross_fields(config)
    return config


def _check_cross_fields(config: dict[str, Any]) -> None:
    """Rules a JSON schema cannot express."""
    if "classify" in config:
        classify_tasks(config)
    if "train" in config:
        embedding_datasets(config)
    if "atlas" in config:
        atlases(config)
    if "integration" in config:
        integrations(config)
    _check_simulations(config)
    fixed = config.get("qc", {}).get("fixed", {})
    for low, high in (("min_genes", "max_genes"), ("min_counts", "max_counts")):
        if fixed.get(low) is not None and fixed.get(high) is not None and fixed[low] > fixed[high]:
            raise ConfigError(f"config key 'qc.fixed.{low}': {fixed[low]} is above qc.fixed.{high} ({fixed[high]}); "
                              "no cell could pass")
    cl = config.get("cluster", {})
    if "marker_resolution" in cl and cl["marker_resolution"] not in cl.get("resolutions", []):
        raise ConfigError(
            f"config key 'cluster.marker_resolution': {cl['marker_resolution']} is not one of "
            f"cluster.resolutions {cl.get('resolutions')}"
        )
    if len(set(cl.get("resolutions", []))) != len(cl.get("resolutions", [])):
        raise ConfigError(f"config key 'cluster.resolutions': duplicate values in {cl['resolutions']}")


def _check_simulations(config: dict[str, Any]) -> None:
    """The simulator's own rules (n_batches <= n_donors, ...), before any job runs."""
    from cellatlas.simulate import SimulationParams, check

    fields = SimulationParams.__dataclass_fields__
    for ds, entry in config.get("datasets", {}).items():
        source = entry.get("source", {})
        if source.get("kind") != "simulate":
            continue
        try:
            check(SimulationParams(**{k: v for k, v in source.items() if k in fields}))
        except ValueError as e:
            raise ConfigError(f"config key 'datasets.{ds}.source': {e}") from None


#: the canonical obs column each dataset key fills (a task's target may name it)
_CANONICAL = {"label": "label_key", "batch": "batch_key", "donor": "donor_key"}


def classify_tasks(config: dict[str, Any], *, check_models: bool = True) -> dict[tuple[str, str], dict[str, Any]]:
    """Every supervised task, resolved: ``{(dataset, task): spec}``.

    ``spec`` holds ``target``, ``kind``, ``split`` (the global split with the task's overrides),
    ``models`` (name -> model entry of the task's kind) and ``dir`` (``classify`` or
    ``regress``, the results folder). With ``classify.tasks: null`` every dataset with a
    ``label_key`` gets the classification task ``label``.

    ``check_models=False`` skips building every estimator to check its params (done once, by
    :func:`validate`); the Snakefile resolves tasks many times while it builds the job graph.

    Raises
    ------
    ConfigError
        A task on an unknown dataset, a target the dataset cannot have, a model kind that does
        not do the task, an estimator parameter scikit-learn does not know, a ``batches`` split
        without its batches.
    """
    from cellatlas import keys

    cl = config.get("classify", {})
    datasets = config.get("datasets", {})
    tasks = cl.get("tasks")
    if tasks is None:
        tasks = {ds: {"label": {"target": "label"}} for ds, entry in datasets.items() if entry.get("label_key")}
    for group in ("classifiers", "regressors") if check_models else ():
        kind = keys.CLASSIFICATION if group == "classifiers" else keys.REGRESSION
        for name, model in cl.get(group, {}).items():
            _check_model(f"classify.{group}.{name}", model, kind)
    out = {}
    for ds, entries in tasks.items():
        if ds not in datasets:
            raise ConfigError(f"config key 'classify.tasks.{ds}': '{ds}' is not a dataset (datasets: {sorted(datasets)})")
        for name, task in entries.items():
            where = f"classify.tasks.{ds}.{name}"
            kind = task.get("kind", keys.CLASSIFICATION)
            target = task["target"]
            if target in _CANONICAL and not datasets[ds].get(_CANONICAL[target]):
                raise ConfigError(f"config key '{where}.target': dataset '{ds}' has no {_CANONICAL[target]}, so no obs '{target}'")
            split = {**cl.get("split", {}), **task.get("split", {})}
            if split.get("scheme") == "batches" and not (split.get("train_batches") and split.get("test_batches")):
                raise ConfigError(f"config key '{where}.split': scheme 'batches' needs train_batches and test_batches")
            group = "classifiers" if kind == keys.CLASSIFICATION else "regressors"
            available = cl.get(group, {})
            chosen = task.get("models") or list(available)
            unknown = [m for m in chosen if m not in available]
            if unknown:
                raise ConfigError(f"config key '{where}.models': {unknown} not in classify.{group} ({sorted(available)})")
            out[(ds, name)] = {
                "target": target,
                "kind": kind,
                "split": split,
                "models": {m: available[m] for m in chosen},
                "dir": keys.TASK_DIRS[kind],
            }
    out.update(image_tasks(config, check_models=check_models))
    return out


#: the simulator's groups, coarsest first
SIMULATED_IMAGE_GROUPS = ["plate", "well", "field"]


def image_group_keys(entry: dict[str, Any]) -> list[str]:
    """An image dataset's group columns, coarsest first (the simulator's when it simulates)."""
    if entry.get("group_keys"):
        return list(entry["group_keys"])
    return list(SIMULATED_IMAGE_GROUPS) if entry["source"]["kind"] == "simulate" else []


def image_tasks(config: dict[str, Any], *, check_models: bool = True) -> dict[tuple[str, str], dict[str, Any]]:
    """The classification task ``label`` of every image dataset (``images.datasets``), with the
    image models (``images.models``, the augmentation laid under their params) and a split
    grouped by the dataset's first group key unless told otherwise."""
    from cellatlas import keys
    from cellatlas.classify.models import image_kinds

    images = config.get("images", {})
    models = images.get("models", {})
    classifiers = config.get("classify", {}).get("classifiers", {})
    for name, model in models.items():
        if model["kind"] not in image_kinds():
            raise ConfigError(f"config key 'images.models.{name}.kind': {model['kind']} does not read images "
                              f"(kinds: {image_kinds()})")
        regressors = config.get("classify", {}).get("regressors", {})
        if name in classifiers or name in regressors:
            raise ConfigError(f"config key 'images.models.{name}': '{name}' is also a model of classify."
                              f"{'classifiers' if name in classifiers else 'regressors'}; name it otherwise")
        if check_models:
            _check_model(f"images.models.{name}", model, keys.CLASSIFICATION)
    for name, model in classifiers.items():
        if model["kind"] in image_kinds():
            raise ConfigError(f"config key 'classify.classifiers.{name}.kind': {model['kind']} reads images; "
                              "it belongs in images.models")
    augmentation = dict(images.get("augmentation", {}))
    out = {}
    for ds, entry in images.get("datasets", {}).items():
        if ds in config.get("datasets", {}):
            raise ConfigError(f"config key 'images.datasets.{ds}': '{ds}' is also a dataset of 'datasets'; "
                              "name it otherwise")
        groups = image_group_keys(entry)
        if entry["source"]["kind"] == "simulate" and (odd := sorted(set(groups) - set(SIMULATED_IMAGE_GROUPS))):
            raise ConfigError(f"config key 'images.datasets.{ds}.group_keys': {odd} are not groups the simulator "
                              f"makes ({SIMULATED_IMAGE_GROUPS})")
        split = {"scheme": "auto", "n_splits": 4, "group_key": None, "train_batches": [], "test_batches": [],
                 **{k: v for k, v in images.get("split", {}).items()}, **entry.get("split", {})}
        if split["group_key"] is None:
            split["group_key"] = groups[0] if groups else keys.DONOR
        elif split["group_key"] not in groups:
            raise ConfigError(f"config key 'images.datasets.{ds}.split.group_key': '{split['group_key']}' is not one "
                              f"of its group_keys {groups}")
        chosen = entry.get("models") or list(models)
        if unknown := [m for m in chosen if m not in models]:
            raise ConfigError(f"config key 'images.datasets.{ds}.models': {unknown} not in images.models "
                              f"({sorted(models)})")
        for m in chosen:
            # a network fitted on this dataset's own images has seen every test fold
            init = str((models[m].get("params") or {}).get("init_weights") or "")
            if init.replace("\\", "/").lstrip("./").startswith(f"results/{ds}/"):
                raise ConfigError(f"config key 'images.models.{m}.params.init_weights': '{init}' was trained on "
                                  f"dataset '{ds}' itself, whose folds it would score; leave '{m}' out of "
                                  f"images.datasets.{ds}.models")
        out[(ds, "label")] = {
            "target": keys.LABEL,
            "kind": keys.CLASSIFICATION,
            "split": split,
            "models": {m: {**models[m], "params": _with_augmentation(models[m].get("params") or {}, augmentation)}
                       for m in chosen},
            "dir": keys.TASK_DIRS[keys.CLASSIFICATION],
            "images": True,
        }
    return out


def _with_augmentation(params: dict[str, Any], augmentation: dict[str, Any]) -> dict[str, Any]:
    """A model's params with images.augmentation under its own augmentation, key by key."""
    return {**params, "augmentation": {**augmentation, **(params.get("augmentation") or {})}}


def embedding_datasets(config: dict[str, Any]) -> list[str]:
    """Datasets that train a VAE: ``train.embedding.datasets``, or (null) every dataset with counts.

    Raises
    ------
    ConfigError
        An unknown dataset, or one whose values are log-normalized (the likelihood needs counts).
    """
    from cellatlas import keys

    datasets = config.get("datasets", {})
    chosen = config.get("train", {}).get("embedding", {}).get("datasets")
    if chosen is None:
        return [ds for ds, d in datasets.items() if d.get("values", keys.VALUES_COUNTS) == keys.VALUES_COUNTS]
    for ds in chosen:
        if ds not in datasets:
            raise ConfigError(f"config key 'train.embedding.datasets': '{ds}' is not a dataset (datasets: {sorted(datasets)})")
        if datasets[ds].get("values", keys.VALUES_COUNTS) != keys.VALUES_COUNTS:
            raise ConfigError(f"config key 'train.embedding.datasets': dataset '{ds}' holds log-normalized values, "
                              "not counts; the VAE's negative-binomial likelihood needs counts")
    return list(chosen)


def integrations(config: dict[str, Any]) -> dict[str, list[str]]:
    """Datasets integrated, each with its methods (``pca`` first; ``vae`` only with counts).

    Raises
    ------
    ConfigError
        An unknown dataset or one without a batch_key, or ``integration.use`` naming a method
        that is not run.
    """
    from cellatlas import keys

    METHODS, BASELINE = keys.INTEGRATION_METHODS, keys.INTEGRATION_BASELINE
    block = config.get("integration", {})
    datasets = config.get("datasets", {})
    chosen = block.get("datasets")
    if chosen is None:
        chosen = [ds for ds, d in datasets.items() if d.get("batch_key")]
    for ds in chosen:
        if ds not in datasets:
            raise ConfigError(f"config key 'integration.datasets': '{ds}' is not a dataset (datasets: {sorted(datasets)})")
        if not datasets[ds].get("batch_key"):
            raise ConfigError(f"config key 'integration.datasets': dataset '{ds}' has no batch_key; integration needs "
                              "to know each cell's batch")
    wanted = [m for m in METHODS if m == BASELINE or m in block.get("methods", keys.INTEGRATION_DEFAULT)]
    use = block.get("use", "best")
    if use != "best" and use not in wanted:
        raise ConfigError(f"config key 'integration.use': '{use}' is not one of integration.methods {wanted}")
    out = {}
    for ds in chosen:
        counts = datasets[ds].get("values", keys.VALUES_COUNTS) == keys.VALUES_COUNTS
        out[ds] = [m for m in wanted if not m.startswith("vae") or counts]
        if "vae_labels" in out[ds] and not datasets[ds].get("label_key"):
            raise ConfigError(f"config key 'integration.methods': vae_labels learns labels, and dataset '{ds}' has "
                              "no label_key")
    return out


#: a results/ folder of its own, so no dataset may take the name
ATLAS_DIR = "atlas"
CALIBRATION_DIR = "calibration"  # results/atlas/<atlas>/calibration/<method>


def atlases(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every atlas, resolved: ``{name: spec}`` with ``reference``, ``queries``, ``label_key``,
    ``methods`` and ``classify_task`` (the reference's task the classifier method uses, or None).

    Raises
    ------
    ConfigError
        An unknown reference or query, a query that is its reference, a label the reference
        cannot have, the latent method on a reference without counts, the classifier method
        without (or with an ambiguous) classification task on the reference.
    """
    from cellatlas import keys

    datasets = config.get("datasets", {})
    entries = config.get("atlas", {}).get("atlases", {}) or {}
    if entries and ATLAS_DIR in datasets:
        raise ConfigError(f"config key 'datasets.{ATLAS_DIR}': the name is reserved for the atlases' results folder")
    tasks = classify_tasks(config, check_models=False) if "classify" in config else {}
    out = {}
    for name, entry in entries.items():
        where = f"atlas.atlases.{name}"
        ref = entry["reference"]
        if ref not in datasets:
            raise ConfigError(f"config key '{where}.reference': '{ref}' is not a dataset (datasets: {sorted(datasets)})")
        for q in entry["queries"]:
            if q not in datasets:
                raise ConfigError(f"config key '{where}.queries': '{q}' is not a dataset (datasets: {sorted(datasets)})")
            if q == ref:
                raise ConfigError(f"config key '{where}.queries': '{q}' is the atlas's reference")
            if q == CALIBRATION_DIR:
                raise ConfigError(f"config key '{where}.queries': the name '{q}' is reserved for the atlas's "
                                  "calibration folder")
        label_key = entry.get("label_key", keys.LABEL)
        if label_key in _CANONICAL and not datasets[ref].get(_CANONICAL[label_key]):
            raise ConfigError(f"config key '{where}.label_key': reference '{ref}' has no {_CANONICAL[label_key]}, "
                              f"so no obs '{label_key}'")
        methods = list(entry.get("methods", ["projection", "latent", "classifier"]))
        if "latent" in methods and datasets[ref].get("values", keys.VALUES_COUNTS) != keys.VALUES_COUNTS:
            raise ConfigError(f"config key '{where}.methods': method 'latent' needs a VAE trained on the reference's "
                              f"counts, and '{ref}' holds log-normalized values")
        task = None
        if "classifier" in methods:
            task = _atlas_task(where, ref, label_key, entry.get("classify_task"), tasks)
        correspondence = dict(entry.get("correspondence") or {})
        for q in correspondence:
            if q not in entry["queries"]:
                raise ConfigError(f"config key '{where}.correspondence': '{q}' is not one of the atlas's queries "
                                  f"({', '.join(entry['queries'])})")
        out[name] = {"reference": ref, "queries": list(entry["queries"]), "label_key": label_key,
                     "methods": methods, "classify_task": task, "correspondence": correspondence}
    return out


def _atlas_task(where: str, ref: str, label_key: str, named: str | None, tasks: dict) -> str:
    from cellatlas import keys

    if named is not None:
        spec = tasks.get((ref, named))
        if spec is None or spec["kind"] != keys.CLASSIFICATION:
            raise ConfigError(f"config key '{where}.classify_task': reference '{ref}' has no classification task "
                              f"'{named}' in classify.tasks")
        if spec["target"] != label_key:
            raise ConfigError(f"config key '{where}.classify_task': task '{named}' predicts '{spec['target']}', "
                              f"the atlas transfers '{label_key}'")
        return named
    found = [t for (ds, t), spec in tasks.items()
             if ds == ref and spec["kind"] == keys.CLASSIFICATION and spec["target"] == label_key]
    need = f"config key '{where}.methods': method 'classifier' uses the reference's best classify-stage model"
    if not found:
        raise ConfigError(f"{need}, and reference '{ref}' has no classification task with target '{label_key}' "
                          "in classify.tasks")
    if len(found) > 1:
        raise ConfigError(f"{need}, and reference '{ref}' has {len(found)} classification tasks with target "
                          f"'{label_key}' ({', '.join(found)}): set atlas.atlases.{where.split('.')[-1]}.classify_task")
    return found[0]


def _check_model(where: str, model: dict[str, Any], kind: str) -> None:
    from cellatlas.classify.models import check_params, kinds_for

    if model["kind"] not in kinds_for(kind):
        raise ConfigError(f"config key '{where}.kind': {model['kind']} does not do {kind} (kinds: {kinds_for(kind)})")
    try:
        check_params(model["kind"], kind, model.get("params"))
    except Exception as e:  # scikit-learn's own message, on one line
        msg = " ".join(str(e).split())
        raise ConfigError(f"config key '{where}.params': {msg}") from None
