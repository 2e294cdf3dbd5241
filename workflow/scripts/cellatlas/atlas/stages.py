"""The atlas rules' entries (the stage contract of cellatlas.stage)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from cellatlas import keys, naming, plotting
from cellatlas.stage import DatasetInput, Result, plot

from cellatlas.atlas import UMAP, VAE_UMAP
from cellatlas.atlas.evaluate import agreement_between, evaluate
from cellatlas.atlas.methods import map_query
from cellatlas.atlas.reference import build_reference, build_reference_vae, with_vae

log = logging.getLogger(__name__)


def reference_stage(*, embed: str, atlas: str, reference: str, label_key: str, seed: int = 0) -> Result:
    """The atlas_reference rule: gather the reference map once; plot it."""
    import anndata as ad


    ref, summary = build_reference(ad.read_h5ad(embed), atlas=atlas, reference=reference, label_key=label_key, seed=seed)
    return Result(metrics=summary, data={"h5ad": ref}, inputs=[DatasetInput(reference, embed, context="reference")],
                  figures={"umap": plot(plotting.embedding, ref.obsm[UMAP], {label_key: ref.obs[keys.LABEL]},
                                        basis="UMAP", title=f"atlas {atlas}: reference {reference} ({ref.n_obs} cells)")})


def reference_vae_stage(*, reference_map: str, vae: str, atlas: str, reference: str, seed: int = 0) -> Result:
    """The atlas_reference_vae rule: the VAE part of the map, once per atlas."""
    import anndata as ad

    out, summary = build_reference_vae(ad.read_h5ad(reference_map), ad.read_h5ad(vae), atlas=atlas,
                                       reference=reference, seed=seed)
    return Result(metrics=summary, data={"h5ad": out}, inputs=[DatasetInput(reference, vae, context="reference")])


def best_model(comparison: str) -> str:
    """The top-ranked model of a classify task's comparison table."""
    table = pd.read_csv(comparison, sep="\t")
    return str(table.sort_values("rank")["model"].iloc[0])


def map_stage(*, reference_map: str, query_h5ad: str, atlas: str, reference: str, query: str, method: str,
              mapping: Mapping[str, Any], seed: int = 0, reference_vae: str | None = None,
              vae_checkpoint: str | None = None, comparison: str | None = None,
              models: Mapping[str, str] | None = None) -> Result:
    """The atlas_map rule: map one query with one method, evaluate, plot."""
    import anndata as ad
    import joblib


    ref = ad.read_h5ad(reference_map)
    if reference_vae:
        ref = with_vae(ref, ad.read_h5ad(reference_vae))
    q = ad.read_h5ad(query_h5ad)
    model, chosen = None, ""
    if method == "classifier":
        chosen = best_model(comparison)
        model = joblib.load(models[chosen])
    table, obsm, info = map_query(
        ref, q, atlas=atlas, reference=reference, query=query, method=method, n_neighbors=mapping["n_neighbors"],
        min_confidence=mapping["min_confidence"], min_shared_genes=mapping["min_shared_genes"], seed=seed,
        vae_checkpoint=vae_checkpoint, model=model)
    truth = q.obs.get(keys.LABEL)
    metrics, per_label, crosstab = evaluate(table["predicted"], truth, list(ref.obs[keys.LABEL].cat.categories))

    cells = table.copy()
    if truth is not None:
        cells["query_label"] = truth.to_numpy()
    cells.index.name = "cell"
    title = f"atlas {atlas}: {query} onto {reference}, {method}" + (f" ({chosen})" if chosen else "")
    umap_key = "X_atlas_umap_vae" if method == "latent" else "X_atlas_umap"
    ref_umap = ref.obsm[VAE_UMAP] if method == "latent" else ref.obsm[UMAP]

    out = ad.AnnData(X=q.X, obs=q.obs.copy(), var=q.var.copy(), obsm=obsm)
    for col, name in (("predicted", "atlas_label"), ("best_label", "atlas_best_label"), ("confidence", "atlas_confidence")):
        out.obs[name] = table[col].to_numpy()
    out.obs["atlas_label"] = out.obs["atlas_label"].astype("category")
    out.uns[keys.UNS_KEY] = {**q.uns.get(keys.UNS_KEY, {}), "atlas": {
        "atlas": atlas, "reference": reference, "method": method, "model": chosen, **dict(mapping), **info}}

    summary: dict[str, Any] = {**metrics, **info, "mean_confidence": float(table["confidence"].mean())}
    log.info("atlas %s, query %s, method %s: %s", atlas, query, method, summary)
    return Result(
        metrics=summary, params={"best_model": chosen} if chosen else {}, data={"h5ad": out},
        tables={"labels": cells.reset_index(), "per_label": per_label,
                "crosstab": crosstab.reset_index(names=crosstab.index.name or "")},
        figures={"crosstab_png": plot(plotting.crosstab, crosstab, title=title),
                 "umap": plot(plotting.joint_embedding, ref_umap, ref.obs[keys.LABEL], obsm[umap_key],
                              table["predicted"], table["confidence"].to_numpy(),
                              basis="UMAP (VAE)" if method == "latent" else "UMAP", title=title)},
        inputs=[DatasetInput(query, query_h5ad, context="query")],
    )


def compare_stage(*, records: Mapping[str, str], labels: Mapping[str, str], atlas: str, reference: str,
                  query: str) -> Result:
    """The atlas_compare rule: the methods side by side, best first, and how often they agree.

    Methods are ranked by accuracy where the query has labels the reference knows, else by the
    share of cells they assign; ties by name.
    """
    import json
    from pathlib import Path

    rows = []
    for method in sorted(records):
        rec = json.loads(Path(records[method]).read_text())
        rows.append({"atlas": atlas, "reference": reference, "query": query, "method": method,
                     "model": rec["params"].get("best_model", ""),
                     **{k: rec["metrics"].get(k, np.nan) for k in COMPARISON_METRICS}, "run_id": rec["run_id"]})
    table = pd.DataFrame(rows)
    scored = table["accuracy"].notna().any()
    key = table["accuracy"] if scored else 1 - table["unassigned_fraction"]
    table = table.assign(_key=key.fillna(-1)).sort_values(["_key", "method"], ascending=[False, True],
                                                            kind="stable").drop(columns="_key")
    table.insert(4, "rank", np.arange(1, len(table) + 1))
    per_cell = {m: pd.read_csv(p, sep="\t", index_col=0)["predicted"] for m, p in labels.items()}
    agree = agreement_between(per_cell)
    metrics: dict[str, Any] = {"best_method": str(table["method"].iloc[0]),
                               "ranked_by": "accuracy" if scored else "assigned share"}
    for row in agree.itertuples():
        metrics[naming.headline("agreement", f"{row.method_a}_{row.method_b}")] = row.same_label
    return Result(metrics=metrics, tables={"table": table.reset_index(drop=True), "agreement": agree})


#: the columns of an atlas comparison table (and of results/atlas.tsv)
COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "unassigned_fraction", "unassigned_shared",
                      "unassigned_novel", "mean_confidence", "n_cells", "n_shared_type_cells", "n_novel_type_cells",
                      "n_shared_genes", "n_shared_hvg")
