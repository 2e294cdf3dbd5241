
import pytest
import yaml
from cellatlas.config import embedding_datasets, validate
from cellatlas.errors import ConfigError
from conftest import ROOT

SCHEMA = ROOT / "config" / "schema" / "config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def test_default_config_is_valid(config):
    validate(config, SCHEMA)


def test_the_users_config_starts_empty_and_the_demo_is_apart():
    from cellatlas.config import classify_tasks

    mine = validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), SCHEMA)
    assert mine["datasets"] == {} and classify_tasks(mine) == {}
    assert "--configfile config/demo.yaml --replace-workflow-config" in (ROOT / "Makefile").read_text()


def test_defaults_are_filled_in():
    cfg = validate({"datasets": {"d1": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}}}}, SCHEMA)
    assert cfg["qc"]["mode"] == "mad" and cfg["qc"]["fixed"]["min_genes"] == 200
    assert cfg["cluster"]["resolutions"] == [0.5, 1.0]
    assert cfg["datasets"]["d1"]["values"] == "counts" and cfg["datasets"]["d1"]["label_key"] is None
    assert cfg["tracking"]["experiment"] == "cellatlas"
    # a section the user's config leaves out is off for their data, not on for every dataset
    assert cfg["classify"]["tasks"] == {} and cfg["classify"]["split"]["scheme"] == "auto"
    assert cfg["train"]["embedding"]["datasets"] == [] and cfg["atlas"]["atlases"] == {}
    assert cfg["run_name"] is None
    assert set(cfg["classify"]["classifiers"]) == {"logistic_regression", "linear_svm", "random_forest",
                                                  "hist_gradient_boosting", "knn", "mlp"}
    assert cfg["classify"]["classifiers"]["knn"]["input"] == "pca"


def test_schema_defaults_are_what_validation_fills_in():
    from cellatlas.config import schema_defaults

    cfg = validate({"datasets": {"d1": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}}}}, SCHEMA)
    assert schema_defaults("train", "embedding") == cfg["train"]["embedding"]
    assert schema_defaults("train", "embedding", schema=SCHEMA)["kl_weight"] == 1.0
    assert schema_defaults("cluster")["resolutions"] == [0.5, 1.0]


def test_classify_tasks_null_means_every_labelled_dataset():
    from cellatlas.config import classify_tasks

    cfg = validate({"datasets": {
        "a": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}, "label_key": "bulk_labels"},
        "b": {"source": {"kind": "scanpy", "name": "krumsiek11"}},
    }, "classify": {"tasks": None}}, SCHEMA)
    tasks = classify_tasks(cfg)
    assert list(tasks) == [("a", "label")]
    spec = tasks[("a", "label")]
    assert spec["kind"] == "classification" and spec["dir"] == "classify" and len(spec["models"]) == 6
    cfg["classify"]["tasks"] = {"a": {"t": {"target": "label", "split": {"n_splits": 3}, "models": ["knn"]}}}
    spec = classify_tasks(cfg)[("a", "t")]
    assert spec["split"]["n_splits"] == 3 and spec["split"]["scheme"] == "auto" and list(spec["models"]) == ["knn"]


def _base():
    return {"datasets": {"d1": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}},
                         "s": {"source": {"kind": "simulate", "n_cells": 300, "n_genes": 100}}}}


def test_lightning_settings_and_models_are_checked_before_any_job():
    cfg = _base()
    cfg["classify"] = {"classifiers": {"net": {"kind": "mlp", "params": {"hiddn": [64]}}}}
    with pytest.raises(ConfigError, match=r"config key 'classify.classifiers.net.params': 'hiddn' is not a parameter of mlp"):
        validate(cfg, SCHEMA)
    cfg["classify"] = {"classifiers": {"net": {"kind": "mlp", "params": {"dropout": 1.5}}}}
    with pytest.raises(ConfigError, match=r"classify.classifiers.net.params': The 'dropout' parameter of MLPClassifier"):
        validate(cfg, SCHEMA)
    cfg = _base()
    cfg["train"] = {"trainer": {"precision": "fp8"}}
    with pytest.raises(ConfigError, match=r"config key 'train.trainer.precision'"):
        validate(cfg, SCHEMA)
    cfg = _base()
    cfg["datasets"]["ln"] = {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}, "values": "lognorm"}
    cfg["train"] = {"embedding": {"datasets": ["ln"]}}
    with pytest.raises(ConfigError, match=r"'train.embedding.datasets': dataset 'ln' holds log-normalized values"):
        validate(cfg, SCHEMA)
    cfg["train"] = {"embedding": {"datasets": ["nope"]}}
    with pytest.raises(ConfigError, match=r"'train.embedding.datasets': 'nope' is not a dataset"):
        validate(cfg, SCHEMA)
    cfg["train"] = {}
    validate(cfg, SCHEMA)
    assert embedding_datasets(cfg) == []  # no train section: no VAE
    cfg["train"] = {"embedding": {"datasets": None}}
    validate(cfg, SCHEMA)
    assert embedding_datasets(cfg) == [d for d in cfg["datasets"] if d != "ln"]  # null: every dataset with counts


def _atlas_config(spec, datasets=None):
    sim = {"source": {"kind": "simulate", "n_cells": 100, "n_genes": 100}, "label_key": "cell_type"}
    cfg = {"datasets": {"ref": dict(sim), "q": dict(sim), **(datasets or {})},
           "classify": {"tasks": {"ref": {"ct": {"target": "label"}}}}, "atlas": {"atlases": {"a": spec}}}
    return cfg


def test_atlases_resolve_with_defaults_and_find_the_classify_task():
    from cellatlas.config import atlases

    cfg = validate(_atlas_config({"reference": "ref", "queries": ["q"]}), SCHEMA)
    spec = atlases(cfg)["a"]
    assert spec["methods"] == ["projection", "latent", "classifier"] and spec["classify_task"] == "ct"
    assert spec["label_key"] == "label" and cfg["atlas"]["min_confidence"] == 0.5


def test_two_matching_classify_tasks_ask_for_classify_task():
    cfg = _atlas_config({"reference": "ref", "queries": ["q"]})
    cfg["classify"]["tasks"]["ref"]["ct2"] = {"target": "label", "split": {"scheme": "stratified"}}
    with pytest.raises(ConfigError, match=r"2 classification tasks with target 'label' \(ct, ct2\): set atlas.atlases.a"):
        validate(cfg, SCHEMA)
    cfg["atlas"]["atlases"]["a"]["classify_task"] = "ct2"
    validate(cfg, SCHEMA)


@pytest.mark.parametrize("alpha, message", [(0, "less than or equal to the minimum of 0"),
                                            (1, "greater than or equal to the maximum of 1")])
def test_alpha_outside_zero_one_is_a_one_line_error(alpha, message):
    cfg = _atlas_config({"reference": "ref", "queries": ["q"]})
    cfg["atlas"]["alpha"] = alpha
    with pytest.raises(ConfigError, match=rf"^config key 'atlas.alpha': {alpha} is {message}$"):
        validate(cfg, SCHEMA)
    cfg["atlas"]["alpha"] = 0.05
    assert validate(cfg, SCHEMA)["atlas"]["alpha"] == 0.05
