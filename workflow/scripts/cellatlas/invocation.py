"""One ``snakemake`` invocation as one MLflow parent run that tells its whole story.

:func:`start_parent` (the Snakefile's ``onstart``) creates the parent: the config as params, its
name (``run_name``, or ``pipeline-<config hash>``), and what changed against the previous
invocation. :func:`end_parent` (``onsuccess``/``onerror``) gives it the headline metrics of
everything the configuration produced, also of results reused from earlier invocations (read from
the result files, which are there either way), a table of every stage run whose results it used,
the summary tables, and prints where to look next.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cellatlas import naming
from cellatlas.errors import TrackingError
from cellatlas.liveness import export_invocation, reap
from cellatlas.store import relocate, sqlite_path
from cellatlas.tracking import (
    ENV_CONFIG_HASH, ENV_EXPERIMENT, ENV_GIT_COMMIT, ENV_INVOCATION, ENV_PARENT, ENV_URI, _client, _experiment_id, check_server,
    common_tags, config_hash, flatten, git_commit,
)

log = logging.getLogger(__name__)

#: config keys that name or place an invocation, not what it computes (kept out of the hash and the diff)
NOT_SCIENCE = ("run_name", "tracking", "keep_intermediate")
UNSET = "(unset)"
#: the parent's tag listing the changed params
TAG_CHANGES = "cellatlas.changes"


def science(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_SCIENCE}


def previous_parent(client, experiment_id: str):
    """The most recent earlier finished invocation in the experiment, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{naming.TAG_KIND}` = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def config_changes(before: Mapping[str, str], after: Mapping[str, str]) -> pd.DataFrame:
    """Every flattened config key whose value differs: ``param``, ``before``, ``after`` ('(unset)' where absent)."""
    keys = sorted(set(before) | set(after))
    rows = [{"param": k, "before": before.get(k, UNSET), "after": after.get(k, UNSET)} for k in keys
            if before.get(k) != after.get(k)]
    return pd.DataFrame(rows, columns=["param", "before", "after"])


def start_parent(*, uri: str, experiment: str, config: Mapping[str, Any], workdir: str | Path) -> str:
    """Create the invocation's parent run and export what jobs need to hang under it."""
    check_server(uri)
    db = sqlite_path(uri)
    if db is not None:
        relocate(db)  # a copied results/ writes into itself, not into the tree it was copied from
    chash = config_hash(science(config))
    os.environ.update(
        {ENV_URI: uri, ENV_EXPERIMENT: experiment, ENV_CONFIG_HASH: chash, ENV_GIT_COMMIT: git_commit(workdir)}
    )
    client = _client(uri)
    exp_id = _experiment_id(client, experiment, uri)
    name = config.get("run_name") or f"pipeline-{chash}"
    os.environ[ENV_INVOCATION] = name
    export_invocation()
    found = reap(client, exp_id, by=f"invocation '{name}' at its start")
    if found["killed"]:
        shown = ", ".join(found["killed"][:5]) + (" ..." if len(found["killed"]) > 5 else "")
        print(f"cellatlas: marked {len(found['killed'])} run(s) KILLED whose process is gone: {shown}", file=sys.stderr)
    if found["unknown"]:
        print(f"cellatlas: {len(found['unknown'])} run(s) RUNNING left as they are (on another host without a SLURM "
              "job id, or another user's)", file=sys.stderr)
    previous = previous_parent(client, exp_id)
    params = flatten(science(config))
    tags = {**common_tags(), naming.TAG_KIND: "pipeline", naming.TAG_STATUS: "running", naming.TAG_STAGE: "pipeline"}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    os.environ[ENV_PARENT] = run_id
    from mlflow.entities import Param

    try:
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
        client.log_dict(run_id, dict(config), "config.json")
        if previous is not None:
            changes = config_changes(previous.data.params, params)
            client.set_tag(run_id, "cellatlas.previous_run", f"{previous.info.run_name} ({previous.info.run_id})")
            client.set_tag(run_id, TAG_CHANGES, "; ".join(f"{r.param}: {r.before} -> {r.after}" for r in
                                                          changes.itertuples())[:4900] or "nothing")
            client.log_text(run_id, changes.to_csv(sep="\t", index=False), "changes.tsv")
    except Exception as e:  # no job starts: the parent must not stay RUNNING (onerror is not called)
        client.set_tag(run_id, naming.TAG_STATUS, "failed")
        client.set_terminated(run_id, status="FAILED")
        del os.environ[ENV_PARENT]
        message = " ".join(str(e).split())[:500]
        raise TrackingError(f"the invocation's parent run could not record the config in {uri}: {message}") from None
    return run_id


def _current(path: Path, config_hash: str | None) -> pd.DataFrame | None:
    """The table at ``path`` if this configuration made it (its ``config_hash`` column), else None:
    an invocation that stopped short of the summary (a partial target) reports no earlier figures."""
    if not path.exists():
        return None
    table = pd.read_csv(path, sep="\t")
    if config_hash and "config_hash" in table and not (table["config_hash"].astype(str) == config_hash).all():
        return None
    return table


def headline_metrics(results: str | Path, config_hash: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The parent's metrics and tags, from the summary tables of ``results`` (4 decimals, as the
    tables show them; the stage runs keep every digit), where ``config_hash`` made them.

    Per dataset: cells kept, best ARI (PCA and VAE), batch mixing; per task: the best model's
    cross-validated primary metric, its margin over the next model (tag: which model) and every
    model's; per integrated dataset and method: scIB total, batch mixing, held-out total (tag: the
    method chosen); per atlas, query and method: accuracy and unassigned share (tag: the method
    chosen; the calibration's figures are in the mapping runs).
    """
    results = Path(results)
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}

    def put(key: str, value: Any) -> None:
        if value is not None and pd.notna(value):
            metrics[key] = float(value)

    if (summary := _current(results / "summary.tsv", config_hash)) is not None:
        for row in summary.to_dict("records"):
            for col in ("cells_kept", "best_ari", "vae_best_ari", "batch_mixing", "vae_batch_mixing"):
                put(naming.headline(row["dataset"], col), row.get(col))
    if (models := _current(results / "models.tsv", config_hash)) is not None:
        for (dataset, task), rows in models.groupby(["dataset", "task"], sort=True):
            rows = rows.sort_values("rank")
            metric = "macro_f1" if rows["kind"].iloc[0] == "classification" else "r2"
            best = rows.iloc[0]
            put(naming.headline(dataset, task, f"best_{metric}"), best[f"{metric}_mean"])
            if len(rows) > 1:
                put(naming.headline(dataset, task, "margin"), best[f"{metric}_mean"] - rows.iloc[1][f"{metric}_mean"])
            tags[f"cellatlas.best.{dataset}.{task}"] = str(best["model"])
            for row in rows.itertuples():  # every model's score: what moves between invocations
                put(naming.headline(dataset, task, str(row.model), metric), getattr(row, f"{metric}_mean"))
    if (integrations := _current(results / "integration.tsv", config_hash)) is not None:
        for row in integrations.to_dict("records"):
            for col in ("total", "batch_mixing", "heldout_total"):
                put(naming.headline(row["dataset"], "integration", row["method"], col), row.get(col))
            if row.get("chosen") is True or str(row.get("chosen")) == "True":
                tags[f"cellatlas.integration.{row['dataset']}"] = str(row["method"])
    if (atlases := _current(results / "atlas.tsv", config_hash)) is not None:
        for row in atlases.to_dict("records"):
            for col in ("accuracy", "unassigned_fraction"):
                put(naming.headline("atlas", row["atlas"], row["query"], row["method"], col), row.get(col))
            if row.get("chosen") is True or str(row.get("chosen")) == "True":
                tags[f"cellatlas.atlas.{row['atlas']}.{row['query']}"] = str(row["method"])
    return metrics, tags


def stage_runs(records: Iterable[str | Path], parent: str) -> pd.DataFrame:
    """One row per stage run whose results the invocation used; ``reused``: made by an earlier one."""
    rows = []
    for path in records:
        if not Path(path).exists():
            continue
        rec = json.loads(Path(path).read_text())
        rows.append({"stage": rec["stage"], "run_name": rec.get("run_name", ""), "dataset": rec.get("dataset", ""),
                     "run_id": rec["run_id"], "invocation": rec.get("parent_run_id", ""),
                     "reused": rec.get("parent_run_id", "") != parent, "record": str(path)})
    return pd.DataFrame(rows, columns=["stage", "run_name", "dataset", "run_id", "invocation", "reused", "record"])


def end_parent(status: str = "FINISHED", *, results: str | Path = "results",
               records: Iterable[str | Path] = (), terminal=sys.stdout) -> None:
    """End the parent run started by :func:`start_parent` in this process (no-op if none).

    On success the parent gets the headline metrics, ``runs.tsv`` and the summary tables, and the
    terminal the run's name and id, the UI command and the tables.
    """
    run_id = os.environ.get(ENV_PARENT)
    if not run_id:
        return
    try:
        metrics, tags = _close_parent(run_id, status, Path(results), records)
        if status == "FINISHED":
            orient(_client(os.environ[ENV_URI]), run_id, Path(results), metrics, tags, terminal=terminal)
    except Exception as e:  # a lost server must not turn the end of the run into a traceback
        message = " ".join(str(e).split())[:300]
        print(f"cellatlas error: could not close the invocation's run {run_id} in {os.environ[ENV_URI]} "
              f"(tracking.uri): {message}; the next invocation marks it KILLED if it is still open",
              file=sys.stderr)


def _close_parent(run_id: str, status: str, results: Path, records: Iterable[str | Path]):
    client = _client(os.environ[ENV_URI])
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        # jobs killed with SIGKILL could not close their runs; Snakemake saw them fail
        reap(client, experiment_id, by=f"invocation '{os.environ.get(ENV_INVOCATION, run_id)}' at its end",
             parent=run_id)
        if status == "FINISHED":
            from mlflow.entities import Metric

            metrics, tags = headline_metrics(results, os.environ.get(ENV_CONFIG_HASH))
            items = [Metric(k, v, 0, 0) for k, v in sorted(metrics.items())]
            for start in range(0, len(items), 1000):
                client.log_batch(run_id, metrics=items[start:start + 1000])
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            runs = stage_runs(records, run_id)
            client.log_text(run_id, runs.to_csv(sep="\t", index=False), "runs.tsv")
            client.set_tag(run_id, "cellatlas.stage_runs", f"{len(runs)} ({int(runs['reused'].sum())} reused)")
            for name in ("summary.tsv", "models.tsv", "atlas.tsv", "integration.tsv"):
                if (results / name).exists():
                    client.log_artifact(run_id, str(results / name))
            from cellatlas.views import save_views

            save_views(client, experiment_id, metrics)
    finally:
        client.set_tag(run_id, naming.TAG_STATUS, status.lower())
        client.set_terminated(run_id, status=status)
    return metrics, tags


def orient(client, run_id: str, results: Path, metrics: Mapping[str, float], tags: Mapping[str, str], *,
           terminal) -> None:
    """Where to look next: the parent run, the UI command, the tables, a few headline figures."""
    from cellatlas.views import view_url

    run = client.get_run(run_id)
    uri = os.environ.get(ENV_URI, "")
    local = uri.startswith("sqlite:")
    base = "http://127.0.0.1:5000" if local else uri
    lines = [
        "",
        f"cellatlas: invocation '{run.info.run_name}' (MLflow run {run_id}, experiment "
        f"'{os.environ.get(ENV_EXPERIMENT, '')}') finished.",
        "  compare runs:  " + (".venv/bin/cellatlas-ui, then open" if local else "open"),
        f"                 {view_url(base, run.info.experiment_id, 'cellatlas-models')}",
        "                 (saved views: Invocations, Models by task, Model scores, Atlas methods,",
        "                 Integration methods, Runs by stage)",
        "  across invocations: .venv/bin/cellatlas-compare" + ("" if local else f" --tracking-uri {uri}"),
        f"  tables:        {results / 'summary.tsv'}, {results / 'models.tsv'}, {results / 'atlas.tsv'}, "
        f"{results / 'integration.tsv'}",
    ]
    if "cellatlas.changes" in run.data.tags:
        lines.append(f"  changed since {run.data.tags.get('cellatlas.previous_run', 'the previous run')}: "
                     f"{run.data.tags['cellatlas.changes'][:300]}")
    best = [f"{key[len('cellatlas.best.'):].replace('.', '/')}: {model}"
            + (f" ({m:.3f})" if (m := _task_metric(metrics, key)) is not None else "")
            for key, model in sorted(tags.items())]
    if best:
        lines.append("  best models:   " + "; ".join(best[:6]) + (" ..." if len(best) > 6 else ""))
    aris = [f"{k.split('/')[0]} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith("/best_ari")]
    if aris:
        lines.append("  best ARI:      " + ", ".join(aris))
    print("\n".join(lines), file=terminal)


def _task_metric(metrics: Mapping[str, float], tag: str) -> float | None:
    dataset, task = tag[len("cellatlas.best."):].split(".", 1)
    for metric in ("best_macro_f1", "best_r2"):
        if naming.headline(dataset, task, metric) in metrics:
            return metrics[naming.headline(dataset, task, metric)]
    return None
