"""Saved views of the MLflow UI's runs page: the comparisons users come for, one link each.

MLflow 3's UI opens an experiment on its GenAI overview and shows runs ungrouped with three
default columns. A saved view (an experiment tag ``mlflow.sharedViewState.<key>``) presets the
filter, grouping, columns and order; the link ``#/experiments/<id>/runs?workflowType=
machine_learning&viewStateShareKey=<key>`` opens it. :func:`save_views` writes them after each
invocation, with the columns of the metrics that invocation produced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from cellatlas import naming

#: MLflow's longest experiment tag value
MAX_TAG = 20000
#: key -> (title, what it answers)
VIEWS = {
    "cellatlas-invocations": ("Invocations", "what each invocation produced, and what changed between them"),
    "cellatlas-models": ("Models by task", "which model is best for each task, and by how much"),
    "cellatlas-scores": ("Model scores", "every model's cross-validated scores as charts (open with compareRunsMode=CHART)"),
    "cellatlas-atlas": ("Atlas methods", "how the atlas mapping methods compare"),
    "cellatlas-integration": ("Integration methods", "which integration keeps biology and removes batches"),
    "cellatlas-stages": ("Runs by stage", "every stage run, grouped by stage"),
}


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def view_states(headline: Iterable[str]) -> dict[str, dict]:
    """The state of each saved view; ``headline`` are the parent runs' metric names."""
    # the invocations' columns: each task's best score, each dataset's best ARI, each atlas method's
    # accuracy (the rest is in every parent run)
    order = ("/best_macro_f1", "/best_r2", "/best_ari", "/accuracy")
    headline = [m for suffix in order for m in sorted(headline) if m.endswith(suffix)]
    kind = f"tags.`{naming.TAG_KIND}`"
    step = f"tags.`{naming.TAG_STEP}`"
    cv = [naming.cv_mean(m) for m in ("macro_f1", "r2")] + [naming.cv_sd(m) for m in ("macro_f1", "r2")]
    atlas = ("accuracy", "assigned_accuracy", "forced_accuracy", "balanced_accuracy", "macro_f1", "unassigned_fraction",
             "unassigned_novel", "set_coverage", "mean_set_size", "heldout_ece", "heldout_coverage")
    return {
        "cellatlas-invocations": {
            "searchFilter": f"{kind} = 'pipeline'", "orderByKey": "attributes.start_time", "orderByAsc": False,
            "selectedColumns": [_column("tags", "cellatlas.changes"), _column("tags", "cellatlas.stage_runs"),
                                *[_column("metrics", m) for m in headline[:40]]],
        },
        "cellatlas-models": {
            "searchFilter": f"{step} = 'model'", "orderByKey": _column("metrics", naming.cv_mean("macro_f1")),
            "orderByAsc": False,
            "groupBy": {"aggregateFunction": "max",
                        "groupByKeys": [{"mode": "tag", "groupByData": naming.TAG_DATASET},
                                        {"mode": "tag", "groupByData": "cellatlas.task"}]},
            "groupsExpanded": {},
            "selectedColumns": [_column("tags", "cellatlas.model"), *[_column("metrics", m) for m in cv],
                                _column("tags", "cellatlas.invocation"), _column("tags", "cellatlas.model_kind"),
                                _column("tags", "cellatlas.split")],
        },
        "cellatlas-scores": {
            "searchFilter": f"{step} = 'model'", "orderByKey": "attributes.start_time", "orderByAsc": True,
            # grouped by task, but every model its own bar in the charts
            "groupBy": {"aggregateFunction": "max",
                        "groupByKeys": [{"mode": "tag", "groupByData": naming.TAG_DATASET},
                                        {"mode": "tag", "groupByData": "cellatlas.task"}]},
            "useGroupedValuesInCharts": False,
            "selectedColumns": [_column("tags", "cellatlas.model"), *[_column("metrics", m) for m in cv],
                                _column("tags", "cellatlas.invocation")],
        },
        "cellatlas-atlas": {
            "searchFilter": f"{step} = 'map'", "orderByKey": _column("metrics", "accuracy"), "orderByAsc": False,
            "groupBy": {"aggregateFunction": "max",
                        "groupByKeys": [{"mode": "tag", "groupByData": "cellatlas.atlas"},
                                        {"mode": "tag", "groupByData": naming.TAG_DATASET}]},
            "selectedColumns": [_column("tags", "cellatlas.method"), *[_column("metrics", m) for m in atlas],
                                _column("tags", "cellatlas.invocation")],
        },
        "cellatlas-integration": {
            "searchFilter": f"tags.`{naming.TAG_STAGE}` = 'integrate' and {step} = 'method'",
            "orderByKey": _column("metrics", "total"), "orderByAsc": False,
            "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": naming.TAG_DATASET}]},
            "groupsExpanded": {},
            "selectedColumns": [_column("tags", "cellatlas.method"),
                                *[_column("metrics", m) for m in ("total", "batch_correction", "bio_conservation",
                                                                  "batch_mixing", "heldout/total", "bio/ari", "batch/ilisi")],
                                _column("tags", "cellatlas.invocation")],
        },
        "cellatlas-stages": {
            "searchFilter": f"{kind} = 'stage'", "orderByKey": "attributes.start_time", "orderByAsc": True,
            "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": naming.TAG_STAGE}]},
            "selectedColumns": [_column("attributes", "Dataset"), _column("tags", naming.TAG_STEP),
                                _column("tags", "cellatlas.invocation")],
        },
    }


def save_views(client, experiment_id: str, headline: Iterable[str]) -> None:
    """Write (or refresh) the saved views on the experiment."""
    now = int(time.time() * 1000)
    for key, state in view_states(headline).items():
        while True:  # MLflow keeps a tag value of at most 20,000 characters: fewer columns, never cut JSON
            envelope = json.dumps({"name": VIEWS[key][0], "createdAt": now, "updatedAt": now, "state": json.dumps(state)})
            if len(envelope) <= MAX_TAG or not state["selectedColumns"]:
                break
            state["selectedColumns"] = state["selectedColumns"][:-1]
        client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", envelope)


def view_url(base: str, experiment_id: str, key: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"
