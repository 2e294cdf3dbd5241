"""The default tracking store (``results/mlflow.db`` + ``results/mlflow-artifacts/``), movable.

MLflow writes artifact locations into its database as absolute paths, so a copied or moved
``results/`` would show the old tree's artifacts, or none, and a new run from the copy would
write into the old tree. :func:`relocate` rewrites those paths to where the database is now;
the pipeline calls it before each invocation and :mod:`cellatlas.ui` before opening the UI.
Nothing else of MLflow's schema holds a path (datasets name their files relative to the
working directory).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

#: the artifact folder beside the database
ARTIFACTS = "mlflow-artifacts"
#: every column of MLflow 3's SQLite schema that holds an artifact location
PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_root(db: Path) -> Path:
    return db.resolve().parent / ARTIFACTS


def recorded_roots(con: sqlite3.Connection) -> set[str]:
    """The artifact roots the database's experiments name (paths, without ``file://``)."""
    roots = set()
    for (location,) in con.execute("SELECT artifact_location FROM experiments"):
        path = location[len("file://"):] if location.startswith("file://") else location
        if path.rstrip("/").endswith("/" + ARTIFACTS):
            roots.add(path.rstrip("/").rsplit("/", 1)[0] + "/" + ARTIFACTS)
    return roots


def relocate(db: str | Path) -> int:
    """Point every artifact location of the store at ``db`` to the folder beside it; returns the rows changed.

    A store that has not moved is left untouched (0). Paths of another root (a store that was
    never this pipeline's) are left as they are.
    """
    db = Path(db)
    if not db.exists():
        return 0
    new = str(artifact_root(db))
    changed = 0
    with sqlite3.connect(db, timeout=60) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for old in sorted(recorded_roots(con) - {new}):
            for table, column in PATH_COLUMNS:
                if table not in tables:
                    continue
                changed += con.execute(
                    f"UPDATE {table} SET {column} = replace({column}, ?, ?) WHERE instr({column}, ?) > 0",  # noqa: S608
                    (old, new, old),
                ).rowcount
            log.info("tracking store %s moved from %s: %d artifact locations rewritten", db, old, changed)
    return changed
