"""``cellatlas-prune``: remove the artifacts of superseded stage runs, keep their numbers.

Every rerun of a job (a changed parameter, ``--forcerun``) logs a new run with its own copy of
figures, tables and models; nothing in MLflow ever removes the old ones. A run is *superseded*
when a later finished run of the same job (the same run name) exists; its artifacts and logged
models are deleted unless a file under ``results/`` still names it (``run.json``) or a registered
model version comes from it. Its params, metrics and tags stay, so invocations still compare in
the UI; the run gets the tag ``cellatlas.pruned``. Nothing is deleted without ``--yes``.

    cellatlas-prune                # what would go, and how much
    cellatlas-prune --yes          # delete it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from cellatlas.naming import TAG_KIND, TAG_PRUNED


def referenced(results: Path) -> set[str]:
    """Run ids the result files name."""
    ids = set()
    for record in results.rglob("run.json"):
        try:
            ids.add(json.loads(record.read_text())["run_id"])
        except (OSError, ValueError, KeyError):
            continue
    return ids


def superseded(client, experiment_id: str, keep: set[str]) -> list:
    """Finished, failed or killed stage runs that a later finished run of the same job replaced."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'stage'", max_results=50000)
    registered = {v.run_id for m in client.search_registered_models() for v in
                  client.search_model_versions(f"name = '{m.name}'")}
    by_job = defaultdict(list)
    for run in runs:
        by_job[run.info.run_name].append(run)
    out = []
    for same in by_job.values():
        finished = [r.info.start_time for r in same if r.info.status == "FINISHED"]
        if not finished:
            continue
        newest = max(finished)
        out += [r for r in same if r.info.start_time < newest and r.info.status != "RUNNING"
                and r.info.run_id not in keep and r.info.run_id not in registered and TAG_PRUNED not in r.data.tags]
    return sorted(out, key=lambda r: r.info.start_time)


def prune(client, run) -> None:
    """Delete the run's artifacts and its logged models' files; tag the run."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    for model in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'"):
        get_artifact_repository(model.artifact_location).delete_artifacts()
        client.delete_logged_model(model.model_id)
    get_artifact_repository(run.info.artifact_uri).delete_artifacts()
    client.set_tag(run.info.run_id, TAG_PRUNED, time.strftime("%Y-%m-%d %H:%M:%S"))


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    from cellatlas.store import relocate, sqlite_path
    from cellatlas.tracking import DEFAULT_EXPERIMENT, check_server, default_uri

    p = argparse.ArgumentParser(prog="cellatlas-prune", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or default_uri("."))
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    p.add_argument("--results", default="results", help="the results folder whose runs are kept")
    p.add_argument("--yes", action="store_true", help="delete (without it: only list)")
    args = p.parse_args(argv)
    check_server(args.tracking_uri)
    if (db := sqlite_path(args.tracking_uri)) is not None:
        relocate(db)
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"cellatlas-prune: no experiment '{args.experiment}' in {args.tracking_uri}")
    runs = superseded(client, experiment.experiment_id, referenced(Path(args.results)))
    for run in runs:
        print(f"{'pruning' if args.yes else 'would prune'} {run.info.run_name} ({run.info.run_id}, "
              f"{run.info.status.lower()})")
        if args.yes:
            prune(client, run)
    verb = "pruned" if args.yes else "superseded (rerun with --yes to delete their artifacts)"
    print(f"cellatlas-prune: {len(runs)} run(s) {verb}", file=sys.stderr)


if __name__ == "__main__":
    main()
