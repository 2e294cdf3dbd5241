"""``cellatlas-ui``: the MLflow UI over this project's tracking store, on localhost.

A copied or moved ``results/`` is relocated first (:func:`cellatlas.store.relocate`), so the UI
shows the copy's own artifacts. The UI listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def ui_command(db: Path, *, host: str, port: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", host, "--port", str(port)]


def view_lines(db: Path, base: str) -> list[str]:
    """One line per saved view of each experiment: its title, what it answers, its link."""
    from mlflow.tracking import MlflowClient

    from cellatlas.views import VIEWS, view_url

    lines = []
    for exp in MlflowClient(f"sqlite:///{db}").search_experiments():
        exp_id, name = exp.experiment_id, exp.name
        if name == "Default":
            continue
        lines.append(f"experiment '{name}':")
        lines += [f"  {title} ({answers}):\n    {view_url(base, str(exp_id), key)}"
                  for key, (title, answers) in VIEWS.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    from cellatlas.server import job_runner_env
    from cellatlas.store import relocate

    parser = argparse.ArgumentParser(prog="cellatlas-ui", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the pipeline's results folder (default: results)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    db = Path(args.results).resolve() / "mlflow.db"
    if not db.exists():
        raise SystemExit(f"cellatlas-ui: no tracking store at {db}; run the pipeline first (make run)")
    relocate(db)
    cmd = ui_command(db, host=args.host, port=args.port)
    print(f"cellatlas-ui: {' '.join(cmd)}", file=sys.stderr)
    for line in view_lines(db, f"http://{args.host}:{args.port}"):
        print(line, file=sys.stderr)
    os.execve(cmd[0], cmd, {**os.environ, **job_runner_env()})


if __name__ == "__main__":
    main()
