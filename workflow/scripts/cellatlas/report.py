"""The summary across datasets, built from the stages' run records (files first, tracker second)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cellatlas.stage import Result

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
        if stage == "integrate":
            row["integration"] = rec.get("params", {}).get("integration", "")
        suffix = {"vae": "_vae", "cluster": "_vae_cluster"}.get(rec.get("step", ""), "") if stage == "train" else ""
        row[f"run_{stage}{suffix}"] = rec["run_id"]
    table = pd.DataFrame(list(rows.values()), columns=None if rows else ["dataset"])  # image datasets only: none
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


def summarize_integrations(tables: Iterable[str | Path]) -> pd.DataFrame:
    """Every integrated dataset's methods in one table (scIB metrics, aggregates, held-out, the choice)."""
    return _stack(tables, first=["dataset", "method", "status", "chosen"], by=["dataset", "method"])


def rounded(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Floats rounded for reading (the run records and MLflow keep every digit)."""
    return table.round({c: digits for c in table.columns if table[c].dtype.kind == "f"})


def summary_stage(*, records: Iterable[str | Path], comparisons: Iterable[str | Path],
                  atlases: Iterable[str | Path], integrations: Iterable[str | Path] = (), config_hash: str) -> Result:
    """The summary rule: one table across datasets, one across every task's models, one across atlases,
    each naming its run ids and the config hash."""
    tables = {"table": summarize(records), "models": summarize_models(comparisons), "atlases": summarize_atlases(atlases),
              "integrations": summarize_integrations(integrations)}
    tables = {k: rounded(t.assign(config_hash=config_hash)) for k, t in tables.items()}
    texts = {f"{k}_html": html_page(t, title=TITLES[k]) for k, t in tables.items()}
    texts["versions"] = html_page(versions(), title="Software versions")
    return Result(tables=tables, texts=texts)


TITLES = {"table": "Datasets", "models": "Models of every task", "atlases": "Atlas mappings",
          "integrations": "Integration methods (scIB metrics)"}
#: the packages whose versions the report lists (pyproject.toml pins them)
PACKAGES = ("anndata", "scanpy", "scikit-learn", "numpy", "scipy", "pandas", "torch", "lightning", "mlflow",
            "snakemake", "leidenalg", "igraph", "umap-learn", "openTSNE", "pynndescent", "matplotlib",
            "scib-metrics", "harmonypy", "bbknn", "jax")


def versions() -> pd.DataFrame:
    """Python and the direct dependencies as installed (what computed the results)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    rows = [{"package": "python", "version": platform.python_version()}]
    for name in PACKAGES:
        try:
            rows.append({"package": name, "version": version(name)})
        except PackageNotFoundError:
            rows.append({"package": name, "version": "not installed"})
    return pd.DataFrame(rows)


def html_page(table: pd.DataFrame, *, title: str) -> str:
    """A table as a small self-contained HTML page (the report shows HTML inline; a TSV only downloads)."""
    import html

    style = ("body{font-family:sans-serif;font-size:12px} table{border-collapse:collapse} "
             "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#eee}")
    body = table.to_html(index=False, na_rep="", border=0)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h3>{html.escape(title)}</h3>{body}</body></html>\n")
