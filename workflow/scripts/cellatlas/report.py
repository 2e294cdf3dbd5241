"""The summary across datasets, built from the stages' run records (files first, tracker second)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

#: columns of the summary, in order: (stage, metric) -> column
COLUMNS = {
    ("ingest", "n_cells"): "cells_in",
    ("ingest", "n_genes"): "genes_in",
    ("qc", "cells_kept"): "cells_kept",
    ("qc", "genes_kept"): "genes_kept",
    ("qc", "doublets_predicted"): "doublets_predicted",
    ("normalize", "n_hvg"): "n_hvg",
    ("embed", "pca_variance_explained"): "pca_variance_explained",
    ("cluster", "best_ari"): "best_ari",
    ("cluster", "best_ari_resolution"): "best_ari_resolution",
    ("train", "best_ari"): "vae_best_ari",
    ("train", "best_ari_resolution"): "vae_best_ari_resolution",
    # how well each embedding's kNN graph mixes the batches (datasets with batches)
    ("cluster", "batch_mixing"): "batch_mixing",
    ("train", "batch_mixing"): "vae_batch_mixing",
}


def summarize(records: Iterable[str | Path]) -> pd.DataFrame:
    """One row per dataset: key metrics of every stage, per-resolution clusters/ARI/NMI, run ids."""
    rows: dict[str, dict] = {}
    for path in records:
        rec = json.loads(Path(path).read_text())
        row = rows.setdefault(rec["dataset"], {"dataset": rec["dataset"]})
        stage, metrics = rec["stage"], rec["metrics"]
        for (s, m), col in COLUMNS.items():
            if s == stage and m in metrics:
                row[col] = metrics[m]
        if stage in ("cluster", "train"):
            # the VAE embedding's clusters beside the PCA embedding's: vae_ari_r1, ari_r1, ...
            prefix = "vae_" if stage == "train" else ""
            for m, v in metrics.items():
                if m.startswith(("n_clusters_r", "ari_r", "nmi_r")):
                    row[prefix + m] = v
        row[f"run_{stage}" + ("_vae" if stage == "train" else "")] = rec["run_id"]
    table = pd.DataFrame(list(rows.values()))
    first = ["dataset"] + [c for c in COLUMNS.values() if c in table]
    rest = sorted(c for c in table.columns if c not in first and not c.startswith("run_"))
    runs = [c for c in table.columns if c.startswith("run_")]
    table = table[first + rest + runs].sort_values("dataset").reset_index(drop=True)
    for col in table.columns:  # metrics travel as floats; show counts as integers
        values = table[col]
        if values.dtype.kind == "f" and values.dropna().apply(float.is_integer).all() and not col.startswith(("ari", "nmi", "best_ari_res", "vae_ari", "vae_nmi", "vae_best_ari_res", "batch_mixing", "vae_batch_mixing")):
            table[col] = values.astype("Int64")
    return table



def _stack(tables: Iterable[str | Path], *, first: list[str], by: list[str]) -> pd.DataFrame:
    frames = [pd.read_csv(p, sep="\t") for p in tables]
    if not frames:
        return pd.DataFrame(columns=first)
    return pd.concat(frames, ignore_index=True).sort_values(by).reset_index(drop=True)


def summarize_models(tables: Iterable[str | Path]) -> pd.DataFrame:
    """Every task's model comparison in one table (dataset, task, split, model, scores, rank, test)."""
    return _stack(tables, first=["dataset", "task", "kind", "split", "model", "rank"], by=["dataset", "task", "rank"])


def summarize_atlases(tables: Iterable[str | Path]) -> pd.DataFrame:
    """Every atlas x query x method in one table (scores, unassigned shares, run ids)."""
    return _stack(tables, first=["atlas", "reference", "query", "method"], by=["atlas", "query", "method"])
