"""Datasets as MLflow sees them: a name, a digest of the file's bytes and its path as the source.

The source is the path relative to the working directory (``results/sim/normalize.h5ad``), so a
moved or copied ``results/`` still names its own files.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

#: bytes read at a time while hashing
CHUNK = 1 << 22


def file_digest(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the sha256 of a file's bytes; of a folder (a Cell Ranger
    matrix folder), of its files' relative paths and bytes, in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
    return h.hexdigest()[:length]


def as_mlflow_dataset(name: str, path: str | Path):
    """An MLflow dataset entity for ``path`` (name, digest, local source)."""
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # MLflow warns that a local path could also be read as another kind of source
        warnings.simplefilter("ignore")
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        source = resolve_dataset_source(str(path))
    return MetaDataset(source=source, name=name, digest=file_digest(path))._to_mlflow_entity()
