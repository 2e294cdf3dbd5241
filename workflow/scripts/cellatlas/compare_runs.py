"""``cellatlas-compare``: chosen headline metrics across every invocation in the tracking store,
with the config differences that explain them, as a table and a figure.

Everything comes from MLflow (the invocations' parent runs: their params are the config, their
metrics the headline figures), not from result files that the next invocation overwrites.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cellatlas import naming
from cellatlas.invocation import config_changes


def invocations(client, experiment: str) -> list:
    """Finished parent runs of the experiment, oldest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"cellatlas-compare: no experiment '{experiment}' in the tracking store")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{naming.TAG_KIND}` = 'pipeline' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"],
                              max_results=10000)


def comparison(runs: Sequence, patterns: Sequence[str] = ()) -> pd.DataFrame:
    """One row per invocation: name, run id, start, the metrics matching ``patterns`` (glob; none:
    every metric whose value differs between invocations, or all when none differs) and what changed
    in the config since the previous invocation."""
    rows, previous = [], None
    for run in runs:
        changes = config_changes(previous.data.params, run.data.params) if previous is not None else None
        rows.append({
            "invocation": run.info.run_name, "run_id": run.info.run_id,
            "start": pd.Timestamp(run.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M:%S"),
            "config_hash": run.data.tags.get("cellatlas.config_hash", ""),
            **run.data.metrics,
            "changed": "(first)" if changes is None else
            ("; ".join(f"{r.param}: {r.before} -> {r.after}" for r in changes.itertuples()) or "nothing"),
        })
        previous = run
    table = pd.DataFrame(rows)
    fixed = ["invocation", "run_id", "start", "config_hash", "changed"]
    metrics = [c for c in table.columns if c not in fixed]
    if patterns:
        chosen = [m for m in metrics if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    else:
        chosen = [m for m in metrics if table[m].round(6).nunique(dropna=False) > 1] or metrics
    return table[["invocation", "run_id", "start", "config_hash", *sorted(chosen), "changed"]]


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    from cellatlas.store import relocate

    parser = argparse.ArgumentParser(prog="cellatlas-compare", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="*", help="metric names or globs ('sim/*', '*/best_macro_f1'); "
                                                   "default: every metric that differs between invocations")
    parser.add_argument("--results", default="results", help="results folder with the SQLite store (default: results)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="a tracking server or store (default: $MLFLOW_TRACKING_URI, else the results folder's)")
    parser.add_argument("--experiment", default="cellatlas")
    parser.add_argument("--out", help="folder for comparison.tsv and comparison.png (default: <results>/compare)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri
    if uri is None:
        db = Path(args.results).resolve() / "mlflow.db"
        if not db.exists():
            raise SystemExit(f"cellatlas-compare: no tracking store at {db}; run the pipeline first")
        relocate(db)
        uri = f"sqlite:///{db}"
    from cellatlas.errors import CellAtlasError
    from cellatlas.tracking import check_server

    try:
        check_server(uri)
    except CellAtlasError as e:
        raise SystemExit(f"cellatlas-compare: {e}") from None
    runs = invocations(MlflowClient(uri), args.experiment)
    if not runs:
        raise SystemExit(f"cellatlas-compare: no finished invocation in experiment '{args.experiment}'")
    table = comparison(runs, args.metrics)
    out = Path(args.out or Path(args.results) / "compare")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.tsv", sep="\t", index=False)
    from cellatlas import plotting

    metrics = [c for c in table.columns if c not in ("invocation", "run_id", "start", "config_hash", "changed")]
    plotting.across_invocations(table.set_index("invocation")[metrics], str(out / "comparison.png"))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 80):
        shown = table.drop(columns=["run_id", "config_hash"]).set_index("invocation").T
        print(shown.round(4).to_string())
    print(f"\n{len(table)} invocations; table {out / 'comparison.tsv'}, figure {out / 'comparison.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
