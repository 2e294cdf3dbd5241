"""The bad-input corpus: inputs the pipeline refuses, and the one line it refuses each with.

Every row of ``CASES`` is one bad input: a config with one wrong key, a data file with one
defect, or stage settings the data cannot satisfy. ``build(tmp_path)`` writes what the row
needs and returns a call with no arguments, the library function the workflow would call on
that input (``cellatlas.config.validate``, the ingest stage, ``run_qc``, ``make_folds``,
the atlas and deep-learning entries). One test runs every row and asserts that the call raises
a :class:`~cellatlas.errors.CellAtlasError` (what the runner shows as one line, without a
traceback) whose message is one line, under 400 characters, matches the row's ``expect``
regex (which names the config key, dataset, file, task or atlas) and that nothing was left in
``tmp_path`` beside the input.

To add a row, append ``Case(id, build, expect)`` to the section it belongs to, building it
with the helpers there when they fit: ``config_with(edit)`` (the demo config with one edit),
``atlas_config(spec)``, ``h5ad_with(defect)`` (the small counts AnnData with one defect,
written and ingested), ``text_file(name, text)`` (a CSV/TSV), ``qc_with(qc)``,
``folds_with(change, **split)``. Ids are unique and start with their section or what they
exercise (config-, tracking-, data-, qc-, normalize-, embed-, task-, atlas-, deep-, model-).
Rows stay library-level and fast: no Snakemake, no network. A row's base without its edit
must pass (``test_the_bases_are_accepted``), so that the row is refused for its own reason.
"""

from __future__ import annotations

import copy
import functools
import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from cellatlas import keys
from cellatlas.config import validate
from cellatlas.errors import CellAtlasError
from conftest import ROOT, task_obs

SCHEMA = ROOT / "config" / "schema" / "config.schema.yaml"
MAX_MESSAGE = 400

# anndata warns about the duplicate names that some rows are about
pytestmark = pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique:UserWarning")


@dataclass(frozen=True)
class Case:
    id: str
    #: writes the row's input under tmp_path and returns the call that must refuse it
    build: Callable[[Path], Callable[[], Any]]
    #: regex the message must match (re.search)
    expect: str


def _dotted(cfg: dict, path: str) -> tuple[dict, str]:
    *head, last = path.split(".")
    for key in head:
        cfg = cfg.setdefault(key, {})
    return cfg, last


def set_key(path: str, value) -> Callable[[dict], None]:
    """An edit that sets ``a.b.c`` (missing parents created: a section the demo leaves out)."""

    def edit(cfg):
        node, last = _dotted(cfg, path)
        node[last] = copy.deepcopy(value)

    return edit


def drop_key(path: str) -> Callable[[dict], None]:
    def edit(cfg):
        node, last = _dotted(cfg, path)
        del node[last]

    return edit


def both(*edits) -> Callable[[dict], None]:
    def edit(cfg):
        for e in edits:
            e(cfg)

    return edit


def rename_dataset(old: str, new: str) -> Callable[[dict], None]:
    def edit(cfg):
        cfg["datasets"][new] = cfg["datasets"].pop(old)

    return edit


# ---------------------------------------------------------------------------------------------
# config: config/demo.yaml (every section in use) with one edit, then validate

@functools.cache
def _demo_text() -> str:
    return (ROOT / "config" / "demo.yaml").read_text()


def demo() -> dict:
    return yaml.safe_load(_demo_text())


def config_with(edit: Callable[[dict], None], base: Callable[[], dict] = demo):
    def build(tmp_path):
        cfg = base()
        edit(cfg)
        return lambda: validate(cfg, SCHEMA)

    return build


def key(name: str, problem: str) -> str:
    """The message of a config row: the key first, then the problem (a regex)."""
    return rf"^config key '{re.escape(name)}': {problem}"


# a url source whose other keys are right, so that one edit makes exactly one mistake
REMOTE = {"source": {"kind": "url", "url": "https://example.org/x.h5", "sha256": "a" * 64, "format": "10x_h5",
                     "filename": "x.h5"}}


def with_remote(edit=None):
    return both(set_key("datasets.remote", REMOTE), *([edit] if edit else []))


def atlas_config(spec: dict, datasets: dict | None = None):
    """An edit-free base with one atlas ``a`` of two small simulated datasets (``ref`` has a task)."""
    sim = {"source": {"kind": "simulate", "n_cells": 100, "n_genes": 100}, "label_key": "cell_type"}

    def base():
        return {"datasets": {"ref": copy.deepcopy(sim), "q": copy.deepcopy(sim), **copy.deepcopy(datasets or {})},
                "classify": {"tasks": {"ref": {"ct": {"target": "label"}}}}, "atlas": {"atlases": {"a": spec}}}

    return config_with(lambda cfg: None, base)


_NOT_ONE_OF = "is not one of"
_LOGNORM_ATLAS_REF = {"ln": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}, "values": "lognorm",
                             "label_key": "bulk_labels"}}

CONFIG_CASES = [
    # from tests/test_config.py::test_bad_config_names_the_key
    Case("config-qc-mode-unknown", config_with(set_key("qc.mode", "fancy")),
         key("qc.mode", re.escape("'fancy' is not one of ['mad', 'fixed']"))),
    Case("config-embed-n_pcs-below-minimum", config_with(set_key("embed.n_pcs", 1)),
         key("embed.n_pcs", "1 is less than the minimum of 2")),
    Case("config-cluster-resolutions-empty", config_with(set_key("cluster.resolutions", [])),
         key("cluster.resolutions", r"\[\] should be non-empty")),
    Case("config-dataset-id-with-space", config_with(rename_dataset("sim", "bad id")),
         key("datasets", "'bad id' does not match")),
    Case("config-source-kind-unknown", config_with(set_key("datasets.sim.source.kind", "zarr")),
         key("datasets.sim.source.kind", f"'zarr' {_NOT_ONE_OF}")),
    Case("config-simulate-without-n_cells", config_with(drop_key("datasets.sim.source.n_cells")),
         key("datasets.sim.source", "'n_cells' is required")),
    Case("config-h5ad-without-path", config_with(set_key("datasets.x", {"source": {"kind": "h5ad"}})),
         key("datasets.x.source", "'path' is required")),
    Case("config-unknown-top-level-key", config_with(set_key("typo", 1)),
         key("(top level)", re.escape("unknown key(s) ('typo' was unexpected)"))),
    Case("config-marker-resolution-not-a-resolution", config_with(set_key("cluster.marker_resolution", 0.7)),
         key("cluster.marker_resolution", "0.7 is not one of cluster.resolutions")),
    Case("config-task-on-unknown-dataset", config_with(set_key("classify.tasks.nope", {"t": {"target": "label"}})),
         key("classify.tasks.nope", "'nope' is not a dataset")),
    Case("config-task-kind-unknown", config_with(set_key("classify.tasks.sim.cell_type.kind", "clustering")),
         key("classify.tasks.sim.cell_type.kind", f"'clustering' {_NOT_ONE_OF}")),
    Case("config-task-model-not-configured", config_with(set_key("classify.tasks.sim.cell_type.models", ["xgboost"])),
         key("classify.tasks.sim.cell_type.models", re.escape("['xgboost'] not in classify.classifiers"))),
    Case("config-regressor-kind-as-classifier", config_with(set_key("classify.classifiers.r", {"kind": "ridge"})),
         key("classify.classifiers.r.kind", "ridge does not do classification")),
    Case("config-model-param-unknown", config_with(set_key("classify.classifiers.knn.params.k", 3)),
         key("classify.classifiers.knn.params", "'k' is not a parameter of knn")),
    Case("config-model-param-out-of-range", config_with(set_key("classify.regressors.ridge.params.alpha", -1)),
         key("classify.regressors.ridge.params", "The 'alpha' parameter of Ridge must be")),
    Case("config-task-split-batches-without-batches",
         config_with(set_key("classify.tasks.sim.cell_type.split", {"scheme": "batches"})),
         key("classify.tasks.sim.cell_type.split", "scheme 'batches' needs train_batches and test_batches")),
    Case("config-task-label-without-label_key", config_with(set_key("datasets.sim.label_key", None)),
         key("classify.tasks.sim.cell_type.target", "dataset 'sim' has no label_key, so no obs 'label'")),
    Case("config-split-n_splits-one", config_with(set_key("classify.split.n_splits", 1)),
         key("classify.split.n_splits", "1 is less than the minimum of 2")),
    # from tests/test_config.py::test_bad_atlas_config_names_the_key
    Case("config-atlas-reference-unknown", atlas_config({"reference": "nope", "queries": ["q"]}),
         key("atlas.atlases.a.reference", "'nope' is not a dataset")),
    Case("config-atlas-query-is-reference", atlas_config({"reference": "ref", "queries": ["ref"]}),
         key("atlas.atlases.a.queries", "'ref' is the atlas's reference")),
    Case("config-atlas-label-without-donor_key", atlas_config({"reference": "ref", "queries": ["q"], "label_key": "donor"}),
         key("atlas.atlases.a.label_key", "reference 'ref' has no donor_key")),
    Case("config-atlas-latent-on-lognorm-reference",
         atlas_config({"reference": "ln", "queries": ["q"], "methods": ["latent"]}, _LOGNORM_ATLAS_REF),
         key("atlas.atlases.a.methods", "method 'latent' needs a VAE trained on the reference's counts")),
    Case("config-atlas-classifier-without-task",
         atlas_config({"reference": "q", "queries": ["ref"], "methods": ["classifier"]}),
         key("atlas.atlases.a.methods", ".*reference 'q' has no classification task with target 'label'")),
    Case("config-atlas-classify_task-unknown",
         atlas_config({"reference": "ref", "queries": ["q"], "classify_task": "other"}),
         key("atlas.atlases.a.classify_task", "reference 'ref' has no classification task 'other'")),
    Case("config-atlas-method-unknown", atlas_config({"reference": "ref", "queries": ["q"], "methods": ["vote"]}),
         key("atlas.atlases.a.methods.0", f"'vote' {_NOT_ONE_OF}")),
    Case("config-atlas-classify_task-other-target",
         atlas_config({"reference": "ref", "queries": ["q"], "label_key": "batch", "classify_task": "ct"},
                      {"ref": {"source": {"kind": "simulate", "n_cells": 100, "n_genes": 100}, "label_key": "cell_type",
                               "batch_key": "batch"}}),
         key("atlas.atlases.a.classify_task", "task 'ct' predicts 'label', the atlas transfers 'batch'")),
    Case("config-atlas-dataset-named-atlas",
         atlas_config({"reference": "ref", "queries": ["q"]},
                      {"atlas": {"source": {"kind": "simulate", "n_cells": 100, "n_genes": 100}}}),
         key("datasets.atlas", "the name is reserved")),
    # top level and datasets
    Case("config-without-datasets", config_with(drop_key("datasets")), key("(top level)", "'datasets' is required")),
    Case("config-datasets-a-list", config_with(set_key("datasets", [])), key("datasets", r"\[\] is not of type 'object'")),
    Case("config-dataset-empty", config_with(set_key("datasets.sim", None)),
         key("datasets.sim", "None is not of type 'object'")),
    Case("config-seed-negative", config_with(set_key("seed", -1)), key("seed", "-1 is less than the minimum of 0")),
    Case("config-seed-a-string", config_with(set_key("seed", "1")), key("seed", "'1' is not of type 'integer'")),
    Case("config-run_name-too-long", config_with(set_key("run_name", "x" * 251)), key("run_name", "'x+' is too long")),
    Case("config-dataset-id-starts-with-digit", config_with(rename_dataset("sim_donors", "1sim")),
         key("datasets", "'1sim' does not match")),
    Case("config-dataset-id-with-dot", config_with(rename_dataset("sim_donors", "sim.v2")),
         key("datasets", r"'sim\.v2' does not match")),
    Case("config-dataset-id-65-characters", config_with(rename_dataset("sim_donors", "s" * 65)),
         key("datasets", "'s{65}' does not match")),
    Case("config-values-unknown", config_with(set_key("datasets.sim.values", "raw")),
         key("datasets.sim.values", f"'raw' {_NOT_ONE_OF}")),
    Case("config-matrix-not-a-string", config_with(set_key("datasets.sim.matrix", 5)),
         key("datasets.sim.matrix", "5 is not of type 'string'")),
    Case("config-label_key-empty", config_with(set_key("datasets.sim.label_key", "")),
         key("datasets.sim.label_key", "'' should be non-empty")),
    Case("config-subset-keep-empty", config_with(set_key("datasets.sim.subset", {"keep": {}})),
         key("datasets.sim.subset.keep", r"\{\} should be non-empty")),
    Case("config-subset-keep-no-values", config_with(set_key("datasets.sim.subset", {"keep": {"batch": []}})),
         key("datasets.sim.subset.keep.batch", r"\[\] should be non-empty")),
    Case("config-subset-unknown-rule", config_with(set_key("datasets.sim.subset", {"only": {"batch": ["batch_0"]}})),
         key("datasets.sim.subset", re.escape("unknown key(s) ('only' was unexpected)"))),
    # sources
    Case("config-simulate-n_cells-below-minimum", config_with(set_key("datasets.sim.source.n_cells", 5)),
         key("datasets.sim.source.n_cells", "5 is less than the minimum of 10")),
    Case("config-simulate-n_types-zero", config_with(set_key("datasets.sim.source.n_types", 0)),
         key("datasets.sim.source.n_types", "0 is less than the minimum of 1")),
    Case("config-simulate-doublet_rate-half", config_with(set_key("datasets.sim.source.doublet_rate", 0.5)),
         key("datasets.sim.source.doublet_rate", "0.5 is greater than or equal to the maximum of 0.5")),
    Case("config-scanpy-name-not-bundled", config_with(set_key("datasets.pbmc68k.source.name", "pbmc3k")),
         key("datasets.pbmc68k.source.name", f"'pbmc3k' {_NOT_ONE_OF}")),
    Case("config-csv-genes_as_rows-a-string",
         config_with(set_key("datasets.tab", {"source": {"kind": "csv", "path": "x.csv", "genes_as_rows": "yes"}})),
         key("datasets.tab.source.genes_as_rows", "'yes' is not of type 'boolean'")),
    Case("config-url-source-kind-without-url", config_with(set_key("datasets.sim.source.kind", "url")),
         key("datasets.sim.source", "'url' is required")),
    Case("config-url-without-sha256", config_with(with_remote(drop_key("datasets.remote.source.sha256"))),
         key("datasets.remote.source", "'sha256' is required")),
    Case("config-url-sha256-not-hex", config_with(with_remote(set_key("datasets.remote.source.sha256", "xyz"))),
         key("datasets.remote.source.sha256", "'xyz' does not match")),
    Case("config-url-without-scheme",
         config_with(with_remote(set_key("datasets.remote.source.url", "www.example.org/x.h5"))),
         key("datasets.remote.source.url", "'www.example.org/x.h5' does not match")),
    Case("config-url-filename-with-slash", config_with(with_remote(set_key("datasets.remote.source.filename", "../x.h5"))),
         key("datasets.remote.source.filename", r"'\.\./x\.h5' does not match")),
    Case("config-url-format-unknown", config_with(with_remote(set_key("datasets.remote.source.format", "loom"))),
         key("datasets.remote.source.format", f"'loom' {_NOT_ONE_OF}")),
    # scientific sections
    Case("config-qc-nmads-zero", config_with(set_key("qc.nmads", 0)),
         key("qc.nmads", "0 is less than or equal to the minimum of 0")),
    Case("config-qc-max_pct_mt-above-100", config_with(set_key("qc.fixed.max_pct_mt", 150)),
         key("qc.fixed.max_pct_mt", "150 is greater than the maximum of 100")),
    Case("config-qc-fixed-typo", config_with(set_key("qc.fixed.min_gene", 3)),
         key("qc.fixed", re.escape("unknown key(s) ('min_gene' was unexpected)"))),
    Case("config-normalize-n_top_genes-five", config_with(set_key("normalize.n_top_genes", 5)),
         key("normalize.n_top_genes", "5 is less than the minimum of 10")),
    Case("config-normalize-target_sum-zero", config_with(set_key("normalize.target_sum", 0)),
         key("normalize.target_sum", "0 is less than or equal to the minimum of 0")),
    Case("config-embed-umap_min_dist-above-1", config_with(set_key("embed.umap_min_dist", 2)),
         key("embed.umap_min_dist", "2 is greater than the maximum of 1")),
    Case("config-cluster-resolutions-duplicate", config_with(set_key("cluster.resolutions", [0.5, 0.5, 1.0])),
         key("cluster.resolutions", re.escape("duplicate values in [0.5, 0.5, 1.0]"))),
    Case("config-cluster-marker_method-unknown", config_with(set_key("cluster.marker_method", "fisher")),
         key("cluster.marker_method", f"'fisher' {_NOT_ONE_OF}")),
    Case("config-cluster-marker_n_genes-zero", config_with(set_key("cluster.marker_n_genes", 0)),
         key("cluster.marker_n_genes", "0 is less than the minimum of 1")),
    # classify
    Case("config-task-target-empty", config_with(set_key("classify.tasks.sim.cell_type.target", "")),
         key("classify.tasks.sim.cell_type.target", "'' should be non-empty")),
    Case("config-task-name-with-space", config_with(set_key("classify.tasks.sim.cell type", {"target": "label"})),
         key("classify.tasks.sim", "'cell type' does not match")),
    Case("config-task-models-empty", config_with(set_key("classify.tasks.sim.cell_type.models", [])),
         key("classify.tasks.sim.cell_type.models", r"\[\] should be non-empty")),
    Case("config-regression-task-with-a-classifier", config_with(set_key("classify.tasks.sim.program.models", ["knn"])),
         key("classify.tasks.sim.program.models", re.escape("['knn'] not in classify.regressors"))),
    Case("config-task-batch-without-batch_key", config_with(set_key("classify.tasks.pbmc68k.by_batch", {"target": "batch"})),
         key("classify.tasks.pbmc68k.by_batch.target", "dataset 'pbmc68k' has no batch_key, so no obs 'batch'")),
    Case("config-split-batches-for-every-task", config_with(set_key("classify.split.scheme", "batches")),
         key("classify.tasks.pbmc68k.cell_type.split", "scheme 'batches' needs train_batches and test_batches")),
    Case("config-task-split-batches-without-test", config_with(
        set_key("classify.tasks.sim.cell_type.split", {"scheme": "batches", "train_batches": ["batch_0"]})),
         key("classify.tasks.sim.cell_type.split", "scheme 'batches' needs train_batches and test_batches")),
    Case("config-split-scheme-unknown", config_with(set_key("classify.split.scheme", "random")),
         key("classify.split.scheme", f"'random' {_NOT_ONE_OF}")),
    Case("config-split-group_key-empty", config_with(set_key("classify.split.group_key", "")),
         key("classify.split.group_key", "'' should be non-empty")),
    Case("config-classifiers-none", config_with(set_key("classify.classifiers", {})),
         key("classify.classifiers", r"\{\} should be non-empty")),
    Case("config-model-input-unknown", config_with(set_key("classify.classifiers.knn.input", "umap")),
         key("classify.classifiers.knn.input", f"'umap' {_NOT_ONE_OF}")),
    Case("config-mlp-param-unknown", config_with(set_key("classify.classifiers.mlp.params.hidden_size", [64])),
         key("classify.classifiers.mlp.params", "'hidden_size' is not a parameter of mlp")),
    Case("config-model-param-wrong-type",
         config_with(set_key("classify.classifiers.random_forest.params.n_estimators", "many")),
         key("classify.classifiers.random_forest.params", "The 'n_estimators' parameter of RandomForestClassifier must be")),
    Case("config-features-genes-unknown", config_with(set_key("classify.features.genes", "random")),
         key("classify.features.genes", f"'random' {_NOT_ONE_OF}")),
    Case("config-comparison-alpha-one", config_with(set_key("classify.comparison.alpha", 1)),
         key("classify.comparison.alpha", "1 is greater than or equal to the maximum of 1")),
    Case("config-comparison-test-unknown", config_with(set_key("classify.comparison.test", "ttest")),
         key("classify.comparison.test", f"'ttest' {_NOT_ONE_OF}")),
    # train
    Case("config-trainer-accelerator-unknown", config_with(set_key("train.trainer.accelerator", "tpu")),
         key("train.trainer.accelerator", f"'tpu' {_NOT_ONE_OF}")),
    Case("config-trainer-unknown-setting", config_with(set_key("train.trainer.gpus", 2)),
         key("train.trainer", re.escape("unknown key(s) ('gpus' was unexpected)"))),
    Case("config-trainer-data_on_device-yes", config_with(set_key("train.trainer.data_on_device", "yes")),
         key("train.trainer.data_on_device", f"'yes' {_NOT_ONE_OF}")),
    Case("config-trainer-max_time-zero", config_with(set_key("train.trainer.max_time_minutes", 0)),
         key("train.trainer.max_time_minutes", "0 is less than or equal to the minimum of 0")),
    Case("config-vae-n_latent-one", config_with(set_key("train.embedding.n_latent", 1)),
         key("train.embedding.n_latent", "1 is less than the minimum of 2")),
    Case("config-vae-dropout-too-high", config_with(set_key("train.embedding.dropout", 0.95)),
         key("train.embedding.dropout", "0.95 is greater than the maximum of 0.9")),
    Case("config-vae-val_fraction-too-high", config_with(set_key("train.embedding.val_fraction", 0.6)),
         key("train.embedding.val_fraction", "0.6 is greater than the maximum of 0.5")),
    Case("config-vae-kl_weight-zero", config_with(set_key("train.embedding.kl_weight", 0)),
         key("train.embedding.kl_weight", "0 is less than or equal to the minimum of 0")),
    Case("config-vae-encoder_input-unknown", config_with(set_key("train.embedding.encoder_input", "raw")),
         key("train.embedding.encoder_input", f"'raw' {_NOT_ONE_OF}")),
    Case("config-vae-genes-unknown", config_with(set_key("train.embedding.genes", "all")),
         key("train.embedding.genes", f"'all' {_NOT_ONE_OF}")),
    Case("config-vae-on-lognorm-dataset", config_with(set_key("train.embedding.datasets", ["pbmc68k"])),
         key("train.embedding.datasets", "dataset 'pbmc68k' holds log-normalized values, not counts")),
    Case("config-vae-dataset-twice", config_with(set_key("train.embedding.datasets", ["sim", "sim"])),
         key("train.embedding.datasets", re.escape("['sim', 'sim'] has non-unique elements"))),
    # atlas and tracking
    Case("config-atlas-n_neighbors-zero", config_with(set_key("atlas.n_neighbors", 0)),
         key("atlas.n_neighbors", "0 is less than the minimum of 1")),
    Case("config-atlas-min_confidence-above-1", config_with(set_key("atlas.min_confidence", 1.5)),
         key("atlas.min_confidence", "1.5 is greater than the maximum of 1")),
    Case("config-atlas-min_shared_genes-zero", config_with(set_key("atlas.min_shared_genes", 0)),
         key("atlas.min_shared_genes", "0 is less than the minimum of 1")),
    Case("config-atlas-queries-empty", config_with(set_key("atlas.atlases.sim_atlas.queries", [])),
         key("atlas.atlases.sim_atlas.queries", r"\[\] should be non-empty")),
    Case("config-atlas-without-reference", config_with(drop_key("atlas.atlases.sim_atlas.reference")),
         key("atlas.atlases.sim_atlas", "'reference' is required")),
    Case("config-atlas-method-twice", config_with(set_key("atlas.atlases.sim_atlas.methods", ["latent", "latent"])),
         key("atlas.atlases.sim_atlas.methods", re.escape("['latent', 'latent'] has non-unique elements"))),
    Case("config-atlas-reference-task-removed", config_with(set_key("classify.tasks.sim_ref", {})),
         key("atlas.atlases.sim_atlas.methods", ".*reference 'sim_ref' has no classification task")),
    Case("config-tracking-experiment-empty", config_with(set_key("tracking.experiment", "")),
         key("tracking.experiment", "'' should be non-empty")),
    Case("config-tracking-uri-a-number", config_with(set_key("tracking.uri", 5)),
         key("tracking.uri", "5 is not of type 'string', 'null'")),
]


# ---------------------------------------------------------------------------------------------
# data: a file with one defect, ingested as the ingest stage does (after validation, so the
# dataset entry has the workflow's defaults)

DS = "d"


@functools.cache
def _sim_cached(**params):
    from cellatlas.simulate import simulate_counts

    return simulate_counts(**params)


def sim(n_cells=60, n_genes=120, n_types=3, n_donors=2, n_batches=2, seed=3):
    """A small simulated counts AnnData (a fresh copy: rows may change it)."""
    return _sim_cached(n_cells=n_cells, n_genes=n_genes, n_types=n_types, n_donors=n_donors, n_batches=n_batches,
                       seed=seed).copy()


def _entry(source: dict, **entry) -> dict:
    return validate({"datasets": {DS: {"source": source, **entry}}}, SCHEMA)["datasets"][DS]


def ingest(name: str, write: Callable[[Path], None] | None, *, kind: str, source: dict | None = None, **entry):
    """build: ``write(tmp_path / name)`` (None: nothing there), then the ingest stage on it."""

    def build(tmp_path):
        from cellatlas.chain import ingest_stage

        path = tmp_path / name
        if write is not None:
            write(path)
        spec = _entry({"kind": kind, "path": str(path), **(source or {})}, **entry)
        return lambda: ingest_stage(DS, spec, path=str(path))

    return build


def h5ad_with(defect: Callable[[Any], Any], **entry):
    """build: the small counts AnnData after ``defect`` (which returns the AnnData to write), as an h5ad."""
    return ingest(f"{DS}.h5ad", lambda path: defect(sim()).write_h5ad(path), kind="h5ad", **entry)


def text_file(name: str, text: str, **entry):
    return ingest(name, lambda path: path.write_text(text), kind="csv", **entry)


def raw_file(name: str, data: bytes, *, kind: str, **entry):
    return ingest(name, lambda path: path.write_bytes(data), kind=kind, **entry)


def in_file(name: str, problem: str) -> str:
    """The message of a data row: the dataset, then the file (any folder), then the problem."""
    return rf"^dataset '{DS}', file '[^']*/{re.escape(name)}': {problem}"


def in_dataset(problem: str) -> str:
    return rf"^dataset '{DS}': {problem}"


def same(a):
    return a


def dense_with(value, at=(1, 2)):
    def defect(a):
        X = a.X.toarray()
        X[at] = value
        a.X = X
        return a

    return defect


def fractional(a):
    a.X = a.X.toarray() * 0.5 + 0.25
    return a


def duplicate_cells(a):
    a.obs_names = ["same"] * 2 + list(a.obs_names[2:])
    return a


def duplicate_genes(a):
    a.var_names = ["G"] * 3 + list(a.var_names[3:])
    return a


def missing_in(column: str, n: int):
    def defect(a):
        col = a.obs[column].astype(object)
        col.iloc[:n] = None
        a.obs[column] = col
        return a

    return defect


def counts_layer(a):
    a.layers["counts"] = a.X.copy()
    return a


def truncated_h5ad(path):
    """An h5ad cut in half, as an interrupted copy leaves it."""
    sim().write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_10x_mtx(a, folder: Path) -> None:
    import scipy.io

    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.csr_matrix(a.X).T.tocoo().astype(np.int64))
    features = pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(a.n_vars)], "name": a.var_names,
                             "type": "Gene Expression"})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(a.obs_names).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


def mtx_folder(change: Callable[[Path], None], **entry):
    """build: a Cell Ranger folder of the small counts, then ``change(folder)``."""

    def write(folder):
        write_10x_mtx(sim(), folder)
        change(folder)

    return ingest("mtx", write, kind="10x_mtx", **entry)


def barcodes(values):
    def change(folder):
        pd.Series(values).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)

    return change


def truncate(name):
    def change(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return change


def _bundled(**entry):
    from cellatlas.chain import ingest_stage

    spec = _entry({"kind": "scanpy", "name": "pbmc68k_reduced"}, **entry)
    return lambda: ingest_stage(DS, spec, path=None)


def _download(content: bytes | None, sha256: str):
    """build: a file:// source (no network) and its download folder; None: the file is not there."""

    def build(tmp_path):
        from cellatlas.ingest import download

        served = tmp_path / "served" / "x.h5ad"
        served.parent.mkdir()
        if content is not None:
            served.write_bytes(content)
        dest = tmp_path / "downloads" / DS / "x.h5ad"
        dest.parent.mkdir(parents=True)  # the workflow's folder; what the download leaves in it is checked
        return lambda: download(served.as_uri(), sha256, str(dest), dataset=DS)

    return build


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CSV_HEADER = "cell,g1,g2\n"

DATA_CASES = [
    # from tests/test_ingest.py::test_missing_and_corrupt_files
    Case("data-h5ad-missing", ingest("nope.h5ad", None, kind="h5ad"), in_file("nope.h5ad", "file does not exist")),
    Case("data-h5ad-garbage-after-signature", raw_file("broken.h5ad", HDF5_SIGNATURE + b"garbage" * 10, kind="h5ad"),
         in_file("broken.h5ad", "cannot read as h5ad")),
    Case("data-csv-words", text_file("words.csv", "cell,g1\nc1,hello\n"),
         in_file("words.csv", re.escape("not a numeric csv matrix (could not convert string to float: 'hello')"))),
    # from tests/test_ingest.py (canonicalize checks), here through a written file
    Case("data-h5ad-negative-value", h5ad_with(dense_with(-1, at=(0, 0))), in_file("d.h5ad", "1 negative values")),
    Case("data-h5ad-nan", h5ad_with(dense_with(np.nan)), in_file("d.h5ad", r"1 non-finite values \(NaN or infinite\)")),
    Case("data-h5ad-inf", h5ad_with(dense_with(np.inf)), in_file("d.h5ad", r"1 non-finite values \(NaN or infinite\)")),
    Case("data-h5ad-non-integer-counts", h5ad_with(fractional),
         in_file("d.h5ad", "non-integer values where counts are required")),
    Case("data-h5ad-lognorm-declared-on-counts", h5ad_with(same, values="lognorm"),
         in_file("d.h5ad", "values: lognorm was set, but the matrix holds integer counts")),
    Case("data-h5ad-duplicate-cells", h5ad_with(duplicate_cells), in_file("d.h5ad", "1 duplicate cell names")),
    Case("data-h5ad-duplicate-genes", h5ad_with(duplicate_genes), in_file("d.h5ad", "2 duplicate gene names")),
    Case("data-h5ad-label_key-missing", h5ad_with(same, label_key="celltype"),
         in_file("d.h5ad", r"label_key 'celltype' is not an obs column \(columns: cell_type, ")),
    Case("data-h5ad-no-cells", h5ad_with(lambda a: a[:0].copy()),
         in_file("d.h5ad", r"the matrix is empty \(0 cells x 120 genes\)")),
    # h5ad files
    Case("data-h5ad-plain-text", raw_file("text.h5ad", b"hello", kind="h5ad"),
         in_file("text.h5ad", r"cannot read as h5ad: OSError: .*file signature not found")),
    Case("data-h5ad-empty-file", raw_file("empty.h5ad", b"", kind="h5ad"), in_file("empty.h5ad", "cannot read as h5ad")),
    Case("data-h5ad-truncated", ingest("cut.h5ad", truncated_h5ad, kind="h5ad"),
         in_file("cut.h5ad", r"cannot read as h5ad: OSError: .*truncated file")),
    Case("data-h5ad-no-genes", h5ad_with(lambda a: a[:, :0].copy()),
         in_file("d.h5ad", r"the matrix is empty \(60 cells x 0 genes\)")),
    Case("data-h5ad-batch_key-missing", h5ad_with(same, batch_key="sample"),
         in_file("d.h5ad", "batch_key 'sample' is not an obs column")),
    Case("data-h5ad-donor_key-missing", h5ad_with(same, donor_key="patient"),
         in_file("d.h5ad", "donor_key 'patient' is not an obs column")),
    Case("data-h5ad-batch-missing-values", h5ad_with(missing_in("batch", 3), batch_key="batch"),
         in_file("d.h5ad", "batch_key 'batch' has 3 missing values")),
    Case("data-h5ad-donor-missing-value", h5ad_with(missing_in("donor", 1), donor_key="donor"),
         in_file("d.h5ad", "donor_key 'donor' has 1 missing values")),
    Case("data-h5ad-matrix-raw-absent", h5ad_with(same, matrix="raw"),
         in_file("d.h5ad", "matrix 'raw' requested but the file has no .raw")),
    Case("data-h5ad-layer-absent", h5ad_with(same, matrix="spliced"),
         in_file("d.h5ad", r"layer 'spliced' not found \(layers: none\)")),
    Case("data-h5ad-lognorm-layer-holds-counts", h5ad_with(counts_layer, matrix="counts", values="lognorm"),
         in_file("d.h5ad", "values: lognorm was set, but the matrix holds integer counts")),
    Case("data-h5ad-read-as-csv", ingest("x.h5ad", lambda p: sim().write_h5ad(p), kind="csv"),
         in_file("x.h5ad", "cannot read as csv: 'utf-8' codec can't decode")),
    Case("data-h5ad-read-as-10x_h5", ingest("x.h5", lambda p: sim().write_h5ad(p), kind="10x_h5"),
         in_file("x.h5", "cannot read as 10x_h5")),
    # CSV / TSV
    Case("data-csv-empty-file", text_file("empty.csv", ""), in_file("empty.csv", "cannot read as csv: No columns to parse")),
    Case("data-csv-header-only", text_file("header.csv", _CSV_HEADER),
         in_file("header.csv", r"the matrix is empty \(0 cells x 2 genes\)")),
    # a semicolon file read as commas: one column of text, no genes
    Case("data-csv-semicolons", text_file("semi.csv", "cell;g1;g2\nc1;1;2\n"),
         in_file("semi.csv", r"the matrix is empty \(1 cells x 0 genes\)")),
    Case("data-csv-negative", text_file("neg.csv", _CSV_HEADER + "c1,1,-2\n"), in_file("neg.csv", "1 negative values")),
    Case("data-csv-fraction", text_file("frac.csv", _CSV_HEADER + "c1,1,0.5\n"),
         in_file("frac.csv", "non-integer values where counts are required")),
    Case("data-csv-empty-field", text_file("na.csv", _CSV_HEADER + "c1,1,\nc2,3,4\n"),
         in_file("na.csv", "1 non-finite values")),
    Case("data-csv-inf", text_file("inf.csv", _CSV_HEADER + "c1,1,inf\n"), in_file("inf.csv", "1 non-finite values")),
    Case("data-csv-duplicate-cells", text_file("dup.csv", _CSV_HEADER + "c1,1,2\nc1,3,4\n"),
         in_file("dup.csv", r"1 duplicate cell names \(e.g. c1\)")),
    Case("data-tsv-genes-as-rows-duplicate-genes",
         text_file("genes.tsv", "gene\tc1\tc2\ng1\t1\t2\ng1\t3\t4\n", source={"genes_as_rows": True}),
         in_file("genes.tsv", r"1 duplicate gene names \(e.g. g1\)")),
    Case("data-csv-ragged-row", text_file("ragged.csv", _CSV_HEADER + "c1,1,2,3,4\n"),
         in_file("ragged.csv", "cannot read as csv: Could not construct index")),
    Case("data-csv-binary", raw_file("bin.csv", bytes(range(256)) * 4, kind="csv"),
         in_file("bin.csv", "cannot read as csv: 'utf-8' codec can't decode")),
    Case("data-csv-gzipped-without-gz-name", raw_file("gz.csv", gzip.compress(b"cell,g1\nc1,1\n"), kind="csv"),
         in_file("gz.csv", "cannot read as csv: 'utf-8' codec can't decode byte 0x8b")),
    # Cell Ranger folders and .h5
    Case("data-10x_mtx-empty-folder", ingest("mtx", lambda p: p.mkdir(), kind="10x_mtx"),
         in_file("mtx", "cannot read as 10x_mtx: FileNotFoundError: Did not find file .*matrix.mtx.gz")),
    Case("data-10x_mtx-path-is-a-file", raw_file("words.csv", b"cell,g1\n", kind="10x_mtx"),
         in_file("words.csv", "cannot read as 10x_mtx: FileNotFoundError")),
    Case("data-10x_mtx-without-features", mtx_folder(lambda f: (f / "features.tsv.gz").unlink()),
         in_file("mtx", "cannot read as 10x_mtx: FileNotFoundError: .*features.tsv.gz")),
    Case("data-10x_mtx-matrix-not-gzipped", mtx_folder(lambda f: (f / "matrix.mtx.gz").rename(f / "matrix.mtx")),
         in_file("mtx", "cannot read as 10x_mtx: FileNotFoundError: Did not find file .*matrix.mtx.gz")),
    Case("data-10x_mtx-truncated-matrix", mtx_folder(truncate("matrix.mtx.gz")),
         in_file("mtx", "cannot read as 10x_mtx: EOFError")),
    Case("data-10x_mtx-fewer-barcodes", mtx_folder(barcodes([f"c{i}" for i in range(10)])),
         in_file("mtx", "cannot read as 10x_mtx: .*obs_names is 10, but this AnnData has shape: \\(60, 120\\)")),
    Case("data-10x_mtx-one-barcode-repeated", mtx_folder(barcodes(["AAACCTG-1"] * 60)),
         in_file("mtx", "59 duplicate cell names")),
    Case("data-10x_h5-garbage", raw_file("bad.h5", HDF5_SIGNATURE + b"x" * 100, kind="10x_h5"),
         in_file("bad.h5", "cannot read as 10x_h5: OSError")),
    # subset (its messages name the dataset: the rule is the config's, not the file's)
    Case("data-subset-drop-column-missing", h5ad_with(same, subset={"drop": {"tissue": ["gut"]}}),
         in_dataset("subset.drop: 'tissue' is not an obs column")),
    # 'label' exists only with a label_key
    Case("data-subset-keep-label-without-label_key", h5ad_with(same, subset={"keep": {"label": ["type_0"]}}),
         in_dataset("subset.keep: 'label' is not an obs column")),
    Case("data-subset-drop-every-batch", h5ad_with(same, subset={"drop": {"batch": ["batch_0", "batch_1"]}}),
         in_dataset("subset keep=.* drop=.* leaves no cells")),
    Case("data-subset-keep-and-drop-the-same",
         h5ad_with(same, subset={"keep": {"batch": ["batch_0"]}, "drop": {"batch": ["batch_0"]}}),
         in_dataset("subset keep=.* drop=.* leaves no cells")),
    # a bundled dataset with the wrong keys
    Case("data-scanpy-label_key-missing",
         lambda tmp_path: _bundled(label_key="celltype", matrix="raw", values="lognorm"),
         in_dataset("label_key 'celltype' is not an obs column .*bulk_labels")),
    # pbmc68k_reduced's X is scaled: declared counts, its negative values say so
    Case("data-scanpy-scaled-X-as-counts", lambda tmp_path: _bundled(), in_dataset(r"\d+ negative values")),
    # downloads (file:// URLs: no network)
    Case("data-download-checksum-mismatch", _download(b"abc", "0" * 64),
         in_dataset("checksum mismatch for file://.*x.h5ad: expected sha256 0{64}, got ba7816bf")),
    Case("data-download-source-missing", _download(None, "0" * 64),
         in_dataset("download of file://.*x.h5ad failed: .*No such file or directory")),
]


# ---------------------------------------------------------------------------------------------
# stages: inputs that pass the config and ingest but that a stage's own check refuses

def canonical(**params):
    from cellatlas.ingest import canonicalize

    return canonicalize(sim(**params), "sim", label_key="cell_type", batch_key="batch", donor_key="donor")


def qc_with(qc: dict):
    """build: run_qc on 600 canonical cells with the config's qc block (defaults filled) plus ``qc``."""

    def build(tmp_path):
        from cellatlas.qc import run_qc

        p = validate({"datasets": {}, "qc": copy.deepcopy(qc)}, SCHEMA)["qc"]
        # seed 1: about 9% mitochondrial counts; other seeds give 50%, and the default
        # max_pct_mt (20) alone would then remove every cell, whatever the row's edit
        adata = canonical(n_cells=600, n_genes=1000, n_donors=4, seed=1)
        return lambda: run_qc(adata, "sim", mode=p["mode"], fixed=p["fixed"], nmads=p["nmads"], nmads_mt=p["nmads_mt"],
                              per_cluster=p["per_cluster"], min_cells=p["min_cells"], doublets=p["doublets"], remove_doublets=p["remove_doublets"])

    return build


def no_cells(bounds: str) -> str:
    return rf"^dataset 'sim': no cells left after QC \(600 cells in; .*{bounds}"


QC_CASES = [
    # from tests/test_qc.py::test_no_cells_left_is_a_clear_error
    Case("qc-min_genes-above-every-cell", qc_with({"mode": "fixed", "fixed": {"min_genes": 100000}}),
         no_cells(r"n_genes_by_counts in \[1e\+05")),
    Case("qc-min_cells-above-n_cells", qc_with({"min_cells": 100000}),
         r"^dataset 'sim': no genes detected in at least 100000 cells after QC"),
    Case("qc-max_pct_mt-zero", qc_with({"mode": "fixed", "fixed": {"max_pct_mt": 0}}),
         no_cells(r"pct_counts_mt in \[-inf, 0\]")),
    Case("qc-max_counts-one", qc_with({"mode": "fixed", "fixed": {"max_counts": 1}}),
         no_cells(r"total_counts in \[-inf, 1\]")),
    Case("qc-mad-capped-at-max_pct_mt-zero", qc_with({"fixed": {"max_pct_mt": 0}}),
         no_cells(r"pct_counts_mt in \[-inf, 0\]")),
]


def folds_with(change: Callable[[pd.DataFrame], pd.DataFrame] = same, **split):
    """build: make_folds (what the classify_split stage calls) on ``change(task_obs())``."""

    def build(tmp_path):
        from cellatlas.classify.splits import make_folds

        obs = change(task_obs())
        split.setdefault("target", "label")
        return lambda: make_folds(obs, dataset="ds", task="t", **split)

    return build


def column(name, values):
    def change(obs):
        obs[name] = values(obs) if callable(values) else values
        return obs

    return change


def in_task(problem: str) -> str:
    return rf"^dataset 'ds', task 't': {problem}"


def _stale_folds(tmp_path):
    """An h5ad rewritten (QC rerun) after the task's folds were fixed on other cells."""
    import anndata as ad
    from cellatlas.classify.splits import make_folds
    from cellatlas.classify.train import model_stage

    obs = task_obs()
    make_folds(obs, dataset="ds", task="t", target="label").write(tmp_path / "folds.tsv.gz", tmp_path / "task.json")
    kept = obs.iloc[10:]
    ad.AnnData(X=sp.csr_matrix((len(kept), 5), dtype=np.float32), obs=kept).write_h5ad(tmp_path / "normalize.h5ad")
    return lambda: model_stage(h5ad=str(tmp_path / "normalize.h5ad"), folds=str(tmp_path / "folds.tsv.gz"),
                               meta=str(tmp_path / "task.json"), dataset="ds", task="t", model_name="m",
                               model={"kind": "logistic_regression"}, features={}, importance={})


CLASSIFY_CASES = [
    # from tests/test_classify_splits.py::test_bad_targets_are_one_line_errors
    Case("task-one-class", folds_with(column("label", "a")),
         in_task(re.escape("target 'label' has 1 class with enough cells ('a'); at least 2 are needed"))),
    Case("task-target-not-a-column", folds_with(target="cell_type"), in_task("target 'cell_type' is not an obs column")),
    Case("task-numeric-target-as-classes", folds_with(target="program"),
         in_task("classification target 'program' is numeric with 600 distinct values; "
                 "for a measured quantity set kind: regression")),
    Case("task-target-all-missing", folds_with(column("label", None)), in_task("target 'label' has no values")),
    Case("task-grouped-one-donor", folds_with(column("donor", "d0"), scheme="grouped"),
         in_task(re.escape("split 'grouped' needs at least 2 groups in 'donor' (found 1)"))),
    Case("task-leave-one-batch-out-one-batch", folds_with(column("batch", "b0"), scheme="leave_one_batch_out"),
         in_task(re.escape("split 'leave_one_batch_out' needs at least 2 batches (found 1)"))),
    # more targets and splits
    Case("task-split-scheme-unknown", folds_with(scheme="random"), in_task("unknown split scheme 'random'")),
    Case("task-grouped-without-donor-column", folds_with(lambda o: o.drop(columns="donor"), scheme="grouped"),
         in_task("split 'grouped' needs an obs column 'donor' \\(its donor_key\\)")),
    Case("task-grouped-every-donor-missing", folds_with(column("donor", None), scheme="grouped"),
         in_task(re.escape("split 'grouped' needs at least 2 groups in 'donor' (found 0)"))),
    Case("task-leave-one-batch-out-without-batch",
         folds_with(lambda o: o.drop(columns="batch"), scheme="leave_one_batch_out"),
         in_task("split 'leave_one_batch_out' needs a batch_key")),
    Case("task-batches-without-train_batches", folds_with(scheme="batches", test_batches=["b1"]),
         in_task("split 'batches' needs split.train_batches")),
    Case("task-batches-train-batch-absent", folds_with(scheme="batches", train_batches=["b7"], test_batches=["b1"]),
         in_task(re.escape("split.train_batches ['b7'] not among the batches ['b0', 'b1']"))),
    Case("task-regression-target-categorical", folds_with(target="label", kind=keys.REGRESSION),
         in_task(re.escape("regression target 'label' is not numeric (dtype category, e.g. "))),
    Case("task-regression-target-boolean", folds_with(column("flag", lambda o: np.arange(len(o)) % 2 == 0),
                                                       target="flag", kind=keys.REGRESSION),
         in_task(re.escape("regression target 'flag' is not numeric (dtype bool"))),
    Case("task-regression-target-infinite",
         folds_with(column("program", lambda o: o["program"].where(o.index != "cell0", np.inf)),
                    target="program", kind=keys.REGRESSION),
         in_task("regression target 'program' has 1 infinite values")),
    Case("task-integer-codes-60-classes", folds_with(column("code", lambda o: (np.arange(len(o)) % 60).astype(float)),
                                                     target="code"),
         in_task("classification target 'code' is numeric with 60 distinct values")),
    Case("task-regression-fewer-cells-than-folds", folds_with(lambda o: o.iloc[:3], target="program", kind=keys.REGRESSION,
                                                              scheme="stratified"),
         in_task("3 cells cannot be split into 5 folds")),
    Case("task-second-class-rarer-than-folds", folds_with(column("label", ["a"] * 597 + ["b"] * 3), scheme="stratified"),
         in_task("target 'label' has 1 class with enough cells \\('a'\\)")),
    Case("task-label-confounded-with-donor",
         folds_with(column("label", lambda o: np.where(o["donor"] == "d0", "x", "y")), scheme="grouped"),
         in_task("fold \\d+ of split 'grouped' has a single class in its training set")),
    Case("task-label-confounded-with-batch",
         folds_with(column("label", lambda o: np.where(o["batch"] == "b0", "x", "y")), scheme="leave_one_batch_out"),
         in_task("fold 0 of split 'leave_one_batch_out' has a single class in its training set")),
    Case("task-batches-train-batch-one-class",
         folds_with(column("label", lambda o: np.where(o["batch"] == "b0", "x", "y")), scheme="batches",
                    train_batches=["b0"], test_batches=["b1"]),
         in_task("fold 0 of split 'batches' has a single class in its training set")),
    Case("task-model-on-stale-folds", _stale_folds,
         in_task("the cells of '[^']*/normalize.h5ad' differ from those of its folds '[^']*/folds.tsv.gz'; "
                 "rerun the split")),
]


def reference_with(labels: dict[str, list]):
    """build: build_reference on 40 cells whose obs holds ``labels`` (its checks come before the map)."""

    def build(tmp_path):
        import anndata as ad
        from cellatlas import atlas

        n = 40
        obs = pd.DataFrame({k: v * (n // len(v)) for k, v in labels.items()}, index=[f"c{i}" for i in range(n)])
        adata = ad.AnnData(X=sp.csr_matrix((n, 20), dtype=np.float32), obs=obs)
        return lambda: atlas.build_reference(adata, atlas="a", reference="ref", label_key="lab")

    return build


def _map(query_var: pd.DataFrame, method="projection", ref_ids: bool = False):
    """build: map_query of a query whose genes are ``query_var`` onto a 20-gene map (10 HVGs)."""

    def build(tmp_path):
        import anndata as ad
        from cellatlas import atlas

        var = pd.DataFrame({"highly_variable": [True] * 10 + [False] * 10}, index=[f"G{i}" for i in range(20)])
        if ref_ids:
            var["gene_ids"] = [f"ENSG{i:011d}.1" for i in range(20)]
        ref = ad.AnnData(obs=pd.DataFrame({keys.LABEL: pd.Categorical(["T", "B"] * 20)}, index=[f"r{i}" for i in range(40)]),
                         var=var)
        q = ad.AnnData(X=sp.csr_matrix(np.ones((5, len(query_var)), np.float32)), var=query_var)
        return lambda: atlas.map_query(ref, q, atlas="a", reference="ref", query="q", method=method, min_shared_genes=5)

    return build


def _vae_map_other_cells(tmp_path):
    import anndata as ad
    from cellatlas import atlas

    ref = ad.AnnData(obs=pd.DataFrame({keys.LABEL: pd.Categorical(["T", "B"] * 20)}, index=[f"r{i}" for i in range(40)]))
    vae = ad.AnnData(obs=pd.DataFrame(index=[f"v{i}" for i in range(40)]),
                     obsm={atlas.VAE: np.zeros((40, 2)), atlas.VAE_UMAP: np.zeros((40, 2))})
    return lambda: atlas.build_reference_vae(ref, vae, atlas="a", reference="ref")


def _overlap(tmp_path):
    from cellatlas import atlas

    align = atlas.GeneAlignment(key="symbol", columns=np.array([0, -1, -1, 3]))
    return lambda: atlas.check_overlap(align, np.ones(4, bool), atlas="a", reference="r", query="q", what="the VAE",
                                       min_shared=3)


def in_atlas(problem: str) -> str:
    return rf"^atlas 'a': {problem}"


_NO_SHARED_HVG = "reference 'ref' and query 'q' share 0 of the 10 genes the reference PCA uses \\(matched by {}\\)"

ATLAS_CASES = [
    # from tests/test_atlas.py::test_reference_map_needs_its_labels
    Case("atlas-reference-label-column-missing", reference_with({"celltype": ["T", "B"]}),
         in_atlas("reference 'ref' has no obs column 'lab' \\(atlas.atlases.a.label_key; columns: celltype\\)")),
    Case("atlas-reference-one-label", reference_with({"lab": ["x"]}),
         in_atlas("reference 'ref': label column 'lab' has 1 distinct label")),
    # from tests/test_atlas.py::test_too_small_an_overlap_names_both_datasets
    Case("atlas-too-few-shared-genes", _overlap,
         in_atlas(re.escape("reference 'r' and query 'q' share 2 of the 4 genes the VAE uses (matched by symbol); "
                            "at least 3"))),
    Case("atlas-reference-labels-all-missing", reference_with({"lab": [None]}),
         in_atlas("reference 'ref': label column 'lab' has 0 distinct label")),
    Case("atlas-reference-label-unassigned", reference_with({"lab": ["unassigned", "T"]}),
         in_atlas("reference 'ref': label 'unassigned' is reserved")),
    Case("atlas-method-unknown", _map(pd.DataFrame(index=[f"G{i}" for i in range(20)]), method="vote"),
         in_atlas("unknown method 'vote' \\(methods: projection, latent, classifier\\)")),
    Case("atlas-query-genes-of-another-panel", _map(pd.DataFrame(index=[f"X{i}" for i in range(20)])),
         in_atlas(_NO_SHARED_HVG.format("symbol"))),
    Case("atlas-query-mouse-symbols", _map(pd.DataFrame(index=[f"g{i}" for i in range(20)])),
         in_atlas(_NO_SHARED_HVG.format("symbol"))),
    # ids win over symbols when both sides have them: the same symbols do not save mouse ids
    Case("atlas-query-mouse-gene-ids",
         _map(pd.DataFrame({"gene_ids": [f"ENSMUSG{i:011d}" for i in range(20)]}, index=[f"G{i}" for i in range(20)]),
              method="classifier", ref_ids=True),
         in_atlas(_NO_SHARED_HVG.format("gene id"))),
    Case("atlas-vae-embedding-of-other-cells", _vae_map_other_cells,
         in_atlas("reference 'ref': the VAE embedding's cells differ from the reference map's")),
]


def _needs_torch():
    pytest.importorskip("torch")


def _vae_without_counts(tmp_path):
    _needs_torch()
    import anndata as ad
    from cellatlas.deep.embedding import train_vae

    adata = ad.AnnData(X=sp.csr_matrix(np.ones((20, 10), np.float32)))  # log-normalized: no counts layer
    return lambda: train_vae(adata, dataset="sim", model={}, trainer={"threads": 1})


def _mlp_on_nan(tmp_path):
    _needs_torch()
    from cellatlas.deep.estimator import MLPClassifier

    rng = np.random.default_rng(0)
    X = sp.csr_matrix(np.log1p(rng.poisson(1.0, (120, 30))).astype(np.float32))
    X.data[:50] = np.nan
    y = rng.choice(["a", "b"], 120)
    return lambda: MLPClassifier(max_epochs=3, trainer={"threads": 1}).fit(X, y)


def _stale_latent(tmp_path):
    """A VAE latent file of other cells than the clustered h5ad (the cluster stage rerun since)."""
    _needs_torch()
    import anndata as ad
    from cellatlas.deep.embedding import cluster_stage

    ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), obsm={"X_vae": np.zeros((2, 2))}).write_h5ad(tmp_path / "latent.h5ad")
    ad.AnnData(obs=pd.DataFrame(index=["a", "c"])).write_h5ad(tmp_path / "cluster.h5ad")
    return lambda: cluster_stage(latent=str(tmp_path / "latent.h5ad"), clustered=str(tmp_path / "cluster.h5ad"),
                                 dataset="sim", embed={}, cluster={})


DEEP_CASES = [
    # from tests/test_deep.py::test_vae_needs_counts
    Case("deep-vae-without-counts", _vae_without_counts,
         r"^dataset 'sim': has no raw counts \(its values are log-normalized\); .*leave it out of train.embedding.datasets"),
    # from tests/test_deep.py::test_nan_loss_stops_with_a_clear_error
    Case("deep-mlp-nan-input", _mlp_on_nan, r"^training loss became nan at epoch 0, batch \d+ .*lower 'lr'"),
    Case("deep-vae-latent-of-other-cells", _stale_latent,
         r"^dataset 'sim': the cells of '[^']*/latent.h5ad' differ from those of '[^']*/cluster.h5ad'; rerun train_vae"),
]

# -- what a careless or hostile environment tried (README: What happens when...) -------------


def _yaml_with_a_key_twice(tmp_path):
    from cellatlas.config import check_files

    path = tmp_path / "config.yaml"
    path.write_text("datasets: {}\nqc:\n  mode: mad\nqc:\n  mode: fixed\n")
    return lambda: check_files([path])


def _tracking(uri: str):
    def build(tmp_path):
        from cellatlas.tracking import check_server

        return lambda: check_server(uri, attempts=1, timeout=2)

    return build


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simulate(**source):
    def build(tmp_path):
        from cellatlas.chain import ingest_stage

        spec = _entry({"kind": "simulate", **source})
        return lambda: ingest_stage(DS, spec, path=None)

    return build


def _download_to(name: str):
    def build(tmp_path):
        from cellatlas.ingest import download

        return lambda: download("file:///nonexistent", "0" * 64, str(tmp_path / "downloads" / DS / name), dataset=DS)

    return build


def _normalize(defect):
    def build(tmp_path):
        from cellatlas.normalize import normalize

        adata = defect(canonical(n_cells=60, n_genes=120))
        return lambda: normalize(adata, DS)

    return build


def constant(a):
    a.X = sp.csr_matrix(np.full(a.shape, 3.0, dtype=np.float32))
    return a


def _integrate_batches(tiny: int):
    """The integrate stage on an embedded dataset whose third batch has ``tiny`` cells."""

    def build(tmp_path):
        from cellatlas.embed import pca
        from cellatlas.ingest import canonicalize
        from cellatlas.integrate.stages import method_stage
        from cellatlas.normalize import normalize
        from cellatlas.simulate import simulate_counts

        a = simulate_counts(n_cells=200, n_genes=150, n_types=2, n_donors=2, n_batches=2, seed=1)
        a = canonicalize(a, DS, label_key="cell_type", batch_key="batch", donor_key="donor")
        a.obs["batch"] = a.obs["batch"].astype(str)
        a.obs.iloc[:tiny, a.obs.columns.get_loc("batch")] = "tiny"
        normalize(a, DS, target_sum=1e4, n_top_genes=100, batch_aware=False)
        pca(a, n_pcs=10)
        a.write_h5ad(tmp_path / "embed.h5ad")
        return lambda: method_stage(h5ad=str(tmp_path / "embed.h5ad"), dataset=DS, method="harmony", params={},
                                    settings={"min_batch_cells": 10, "holdout": False, "holdout_donor": None},
                                    embed={"n_pcs": 10, "scale": True, "n_neighbors": 10})

    return build


def _embed_cells(n: int):
    def build(tmp_path):
        from cellatlas.chain import embed_stage

        adata = canonical(n_cells=60, n_genes=120)[:n].copy()
        adata.var["highly_variable"] = True
        adata.write_h5ad(tmp_path / "normalize.h5ad")
        p = validate({"datasets": {}}, SCHEMA)["embed"]
        return lambda: embed_stage(str(tmp_path / "normalize.h5ad"), DS, p, seed=0, threads=1)

    return build


def _nan_validation(tmp_path):
    import torch
    from cellatlas.deep.plans import ClassifierPlan

    plan = ClassifierPlan(n_genes=5, n_classes=2)
    batch = (torch.full((4, 5), float("nan")), torch.tensor([0, 1, 0, 1]), torch.empty(0))
    return lambda: plan.validation_step(batch, 0)


def _model_file(expected):
    def build(tmp_path):
        from cellatlas.modelstore import check_file

        (tmp_path / "model.joblib").write_bytes(b"a pickled model")
        return lambda: check_file(tmp_path / "model.joblib", expected, what="model file")

    return build


_CELLS_AS_ROWS = "cell,MT-CO1,GENE1,GENE2\nAAACATACAACCAC-1,1,2,3\nAAACATTGAGCTAC-1,0,4,1\nAAACATTGATCAGC-1,2,0,5\n"
_GENES_AS_ROWS = "gene,AAACATACAACCAC-1,AAACATTGAGCTAC-1\nMT-CO1,1,0\nGENE1,2,4\nENSG00000141510,3,1\n"

RELIABILITY_CASES = [
    Case("config-yaml-key-given-twice", _yaml_with_a_key_twice,
         r"^config file '[^']*/config.yaml', line 4: key 'qc' is given twice \(first on line 2\); keep one"),
    Case("config-simulate-n_batches-above-n_donors", config_with(set_key("datasets.sim.source.n_batches", 9)),
         key("datasets.sim.source", "n_batches cannot exceed n_donors")),
    Case("config-simulate-program_genes-above-genes", config_with(set_key("datasets.sim.source.program_genes", 10**6)),
         key("datasets.sim.source", "program_genes must be between 0 and the number of ordinary genes")),
    Case("config-url-filename-dotdot", config_with(with_remote(set_key("datasets.remote.source.filename", ".."))),
         key("datasets.remote.source.filename", "'..' does not match")),
    Case("config-url-filename-dot", config_with(with_remote(set_key("datasets.remote.source.filename", "."))),
         key("datasets.remote.source.filename", "'.' does not match")),
    Case("config-integration-dataset-without-batches", config_with(set_key("integration.datasets", ["pbmc68k"])),
         key("integration.datasets", "dataset 'pbmc68k' has no batch_key; integration needs to know each cell's batch")),
    Case("config-integration-use-not-run",
         config_with(both(set_key("integration.methods", ["harmony"]), set_key("integration.use", "bbknn"))),
         key("integration.use", re.escape("'bbknn' is not one of integration.methods ['pca', 'harmony']"))),
    Case("config-integration-method-unknown", config_with(set_key("integration.methods", ["scanorama"])),
         key("integration.methods.0", f"'scanorama' {_NOT_ONE_OF}")),
    Case("config-integration-max-bio-loss-above-one", config_with(set_key("integration.max_bio_loss", 2)),
         key("integration.max_bio_loss", "2 is greater than the maximum of 1")),
    Case("config-qc-min_genes-above-max_genes",
         config_with(both(set_key("qc.fixed.min_genes", 300), set_key("qc.fixed.max_genes", 200))),
         key("qc.fixed.min_genes", r"300 is above qc.fixed.max_genes \(200\); no cell could pass")),
    Case("config-qc-min_counts-above-max_counts",
         config_with(both(set_key("qc.fixed.min_counts", 5000), set_key("qc.fixed.max_counts", 1000))),
         key("qc.fixed.min_counts", r"5000 is above qc.fixed.max_counts \(1000\)")),
    Case("tracking-uri-unknown-scheme", _tracking("foo://somewhere"),
         r"^tracking.uri \(or MLFLOW_TRACKING_URI\) 'foo://somewhere': MLflow cannot track to a 'foo' URI"),
    Case("tracking-uri-with-password", _tracking("http://alice:secret@login01:5000"),
         r"^tracking.uri \(or MLFLOW_TRACKING_URI\) for login01: holds credentials; .*MLFLOW_TRACKING_PASSWORD"),
    Case("tracking-server-unreachable", _tracking(f"http://127.0.0.1:{_closed_port()}"),
         r"^MLflow tracking server http://127.0.0.1:\d+ \(tracking.uri or MLFLOW_TRACKING_URI\) cannot be used from host"),
    Case("data-csv-cells-as-rows-declared-genes-as-rows",
         ingest("cells.csv", lambda p: p.write_text(_CELLS_AS_ROWS), kind="csv", source={"genes_as_rows": True}),
         in_file("cells.csv", r"genes_as_rows: true reads the rows as genes, but the cells are named like genes "
                              r"\(e.g. 'MT-CO1'\) .*set genes_as_rows: false")),
    Case("data-csv-genes-as-rows-declared-cells-as-rows", text_file("genes.csv", _GENES_AS_ROWS),
         in_file("genes.csv", r"genes_as_rows: false reads the columns as genes, .*set genes_as_rows: true")),
    Case("data-csv-gene-column-twice", text_file("twice.csv", "cell,g1,g1\nc1,1,2\n"),
         in_file("twice.csv", r"1 names repeated in the header \(e.g. g1\)")),
    Case("data-csv-column-without-name", text_file("blank.csv", "cell,g1,,g3\nc1,1,2,3\n"),
         in_file("blank.csv", "column 3 of the header has no name")),
    Case("data-h5ad-path-is-a-folder", ingest("d.h5ad", lambda p: p.mkdir(), kind="h5ad"),
         in_file("d.h5ad", r"is a folder, not a h5ad file \(a Cell Ranger matrix folder is kind: 10x_mtx\)")),
    Case("data-simulate-beyond-memory", _simulate(n_cells=5_000_000, n_genes=2000),
         in_dataset(r"simulating 5,000,000 cells x 2,000 genes needs about [\d.]+ GiB, more than the [\d.]+ GiB "
                    r"(available on this machine|of SLURM job).*lower source.n_cells")),
    Case("data-download-name-dotdot", _download_to(".."),
         in_dataset(r"download file name '..' is not one plain file name \(source.filename\)")),
    Case("normalize-no-gene-varies", _normalize(constant),
         in_dataset(r"no gene varies across its 60 cells \(120 genes\)")),
    Case("embed-three-cells", _embed_cells(3),
         in_dataset(r"3 cells are left to embed; the maps need more than 10 \(embed.n_neighbors")),
    Case("integrate-batch-of-three-cells", _integrate_batches(3),
         in_dataset(r"batch 'tiny' has 3 cells after QC; integration needs at least 10 per batch "
                    r"\(integration.min_batch_cells\): drop it")),
    Case("deep-mlp-nan-validation-loss", _nan_validation,
         r"^validation loss became nan at epoch 0, batch 0 .*lower 'lr'"),
    Case("model-file-changed", _model_file("0" * 64),
         r"^model file '[^']*/model.joblib': its bytes do not match the sha256 its run recorded .*not loaded"),
    Case("model-file-without-digest", _model_file(None),
         r"^model file '[^']*/model.joblib': the run that wrote it recorded no digest; rerun that job"),
]

CASES = CONFIG_CASES + DATA_CASES + QC_CASES + CLASSIFY_CASES + ATLAS_CASES + DEEP_CASES + RELIABILITY_CASES


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_in_one_line(case, tmp_path):
    call = case.build(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(CellAtlasError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    assert len(message) < MAX_MESSAGE, message
    assert re.search(case.expect, message), f"{message!r} does not match {case.expect!r}"
    # a refused input leaves nothing behind: no partial output, download or cache next to it
    assert _listing(tmp_path) == before


def test_the_bases_are_accepted(tmp_path):
    """Each row's input without its edit or defect passes: what a row refuses is its one change."""
    validate(demo(), SCHEMA)
    atlas_config({"reference": "ref", "queries": ["q"]})(tmp_path)()
    for build in (h5ad_with(same), text_file("ok.csv", _CSV_HEADER + "c1,1,2\n"), mtx_folder(lambda folder: None),
                  qc_with({"doublets": False}), qc_with({"mode": "fixed", "doublets": False}), folds_with(),
                  folds_with(scheme="batches", train_batches=["b0"], test_batches=["b1"])):
        build(tmp_path)()


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(CASES) >= 55
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
