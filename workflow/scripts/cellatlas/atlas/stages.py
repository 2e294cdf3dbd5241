"""The atlas rules' entries (the stage contract of cellatlas.stage)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellatlas import keys, naming, plotting
from cellatlas.stage import DatasetInput, Result, plot

from cellatlas.atlas import PCA, UMAP, VAE, VAE_UMAP
from cellatlas.atlas.evaluate import agreement_between, check_correspondence, evaluate
from cellatlas.atlas.methods import map_query
from cellatlas.atlas.reference import build_reference, build_reference_vae, with_vae

log = logging.getLogger(__name__)


def reference_stage(*, embed: str, atlas: str, reference: str, label_key: str, seed: int = 0,
                    queries: Mapping[str, str] | None = None, min_shared_genes: int = 100) -> Result:
    """The atlas_reference rule: gather the reference map once, on the genes its ``queries``
    (name -> normalize.h5ad, of which only the genes are read) share; plot it."""
    import anndata as ad

    query_genes = {}
    for query, path in (queries or {}).items():
        backed = ad.read_h5ad(path, backed="r")
        query_genes[query] = backed.var.copy()
        backed.file.close()
    ref, summary = build_reference(ad.read_h5ad(embed), atlas=atlas, reference=reference, label_key=label_key, seed=seed,
                                   query_genes=query_genes, min_shared_genes=min_shared_genes)
    inputs = [DatasetInput(reference, embed, context="reference"),
              *(DatasetInput(query, path, context="query genes") for query, path in (queries or {}).items())]
    return Result(metrics=summary, data={"h5ad": ref}, inputs=inputs,
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


def calibrate_stage(*, reference_map: str, atlas: str, reference: str, method: str, alpha: float,
                    min_confidence: float, novelty_alpha: float, n_neighbors: int, seed: int = 0,
                    reference_vae: str | None = None, comparison: str | None = None,
                    predictions: Mapping[str, str] | None = None) -> Result:
    """The atlas_calibrate rule: a method's held-out reference cells, its calibration and
    prediction sets measured on them by cross-fitting, and (kNN methods) each reference type left
    out in turn (:mod:`cellatlas.atlas.calibration`)."""
    import anndata as ad

    from cellatlas.atlas.calibration import check_heldout, cross_fit, novelty, summarize
    from cellatlas.atlas.methods import heldout_classifier, heldout_knn

    chosen = ""
    ref = ad.read_h5ad(reference_map)
    if method == "classifier":
        chosen = best_model(comparison)
        # labels as text: integer codes ("1") would come back as floats where some cells have none
        oof = pd.read_csv(predictions[chosen], sep="\t", dtype={"cell": str, "target": str, "prediction": str})
        held = heldout_classifier(oof, ref, n_neighbors=n_neighbors, seed=seed)
    else:
        if method == "latent":
            ref = with_vae(ref, ad.read_h5ad(reference_vae))
        held = heldout_knn(ref, VAE if method == "latent" else PCA, n_neighbors=n_neighbors, seed=seed)
    check_heldout(held, atlas=atlas, method=method, alpha=alpha)
    crossed, left_out = cross_fit(held, alpha=alpha, seed=seed)
    metrics, table, coverage = summarize(crossed, novelty_alpha=novelty_alpha)
    novel_metrics, novel = novelty(crossed, left_out, min_confidence=min_confidence,
                                   novelty_alpha=novelty_alpha)
    metrics.update(novel_metrics)
    heldout = pd.concat([crossed, held.table.filter(like="score_")], axis=1)
    title = f"atlas {atlas}: {method}" + (f" ({chosen})" if chosen else "") + f", {len(heldout)} held-out reference cells"
    log.info("atlas %s, method %s: %s", atlas, method, metrics)
    return Result(metrics=metrics, params={"best_model": chosen} if chosen else {},
                  tables={"heldout": heldout.reset_index(), "reliability": table, "coverage": coverage,
                          "novel": novel},
                  figures={"figure": plot(plotting.reliability, table, coverage, crossed, left_out, alpha=alpha,
                                          title=title)})


def map_stage(*, reference_map: str, query_h5ad: str, atlas: str, reference: str, query: str, method: str,
              mapping: Mapping[str, Any], heldout: str, calibration: str,
              correspondence: Mapping[str, Sequence[str]] | None = None, seed: int = 0,
              reference_vae: str | None = None, vae_checkpoint: str | None = None, comparison: str | None = None,
              models: Mapping[str, str] | None = None) -> Result:
    """The atlas_map rule: map one query with one method, calibrated on the method's held-out
    reference cells (``heldout``, the atlas_calibrate table; ``calibration``, its run record);
    evaluate, plot. A ``correspondence`` naming a label the reference lacks fails before mapping."""
    import json
    from pathlib import Path

    import anndata as ad
    import joblib

    from cellatlas.atlas.calibration import HeldOut

    ref = ad.read_h5ad(reference_map)
    if reference_vae:
        ref = with_vae(ref, ad.read_h5ad(reference_vae))
    q = ad.read_h5ad(query_h5ad)
    model, chosen = None, ""
    if method == "classifier":
        chosen = best_model(comparison)
        model = joblib.load(models[chosen])
    reference_labels = list(map(str, ref.obs[keys.LABEL].cat.categories))
    check_correspondence(correspondence, reference_labels, atlas=atlas, reference=reference, query=query)
    held = HeldOut(pd.read_csv(heldout, sep="\t", index_col="cell",
                               dtype={"cell": str, "label": str, "best_label": str, "label_set": str}))
    fitted = held.fit(alpha=mapping["alpha"], seed=seed)
    table, obsm, info = map_query(
        ref, q, atlas=atlas, reference=reference, query=query, method=method, n_neighbors=mapping["n_neighbors"],
        min_confidence=mapping["min_confidence"], novelty_alpha=mapping["novelty_alpha"],
        min_shared_genes=mapping["min_shared_genes"], seed=seed,
        vae_checkpoint=vae_checkpoint, model=model, calibration=fitted)
    truth = q.obs.get(keys.LABEL)
    metrics, per_label, crosstab = evaluate(table["predicted"], truth, reference_labels, label_set=table["label_set"],
                                            correspondence=correspondence, best_label=table["best_label"])
    # the method's calibration, measured on held-out reference cells, beside what the query shows
    held_metrics = json.loads(Path(calibration).read_text())["metrics"]
    metrics.update({ours: held_metrics[theirs] for ours, theirs in HELDOUT_METRICS.items() if theirs in held_metrics})
    metrics["mean_set_size"] = float(table["set_size"].mean())

    cells = table.copy()
    if truth is not None:
        cells["query_label"] = truth.to_numpy()
    cells.index.name = "cell"
    title = f"atlas {atlas}: {query} onto {reference}, {method}" + (f" ({chosen})" if chosen else "")
    umap_key = "X_atlas_umap_vae" if method == "latent" else "X_atlas_umap"
    ref_umap = ref.obsm[VAE_UMAP] if method == "latent" else ref.obsm[UMAP]

    out = ad.AnnData(X=q.X, obs=q.obs.copy(), var=q.var.copy(), obsm=obsm)
    for col, name in (("predicted", "atlas_label"), ("best_label", "atlas_best_label"), ("confidence", "atlas_confidence"),
                      ("label_set", "atlas_label_set"), ("set_size", "atlas_set_size")):
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
    """The atlas_compare rule: the methods side by side, best first (:func:`rank_methods`), and
    how often they agree."""
    import json
    from pathlib import Path

    rows = []
    for method in sorted(records):
        rec = json.loads(Path(records[method]).read_text())
        rows.append({"atlas": atlas, "reference": reference, "query": query, "method": method,
                     "model": rec["params"].get("best_model", ""),
                     **{k: rec["metrics"].get(k, np.nan) for k in COMPARISON_METRICS}, "run_id": rec["run_id"]})
    table, rule = rank_methods(pd.DataFrame(rows))
    per_cell = {m: pd.read_csv(p, sep="\t", index_col=0)["predicted"] for m, p in labels.items()}
    agree = agreement_between(per_cell)
    metrics: dict[str, Any] = {"best_method": str(table["method"].iloc[0]), "ranked_by": rule}
    for row in agree.itertuples():
        metrics[naming.headline("agreement", f"{row.method_a}_{row.method_b}")] = row.same_label
    return Result(metrics=metrics, tables={"table": table.reset_index(drop=True), "agreement": agree})


def rank_methods(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The methods best first, with ``rank``, ``score`` and ``chosen`` (the first), and the rule in words.

    With query labels the reference knows, the score is the share of labelled query cells handled
    right: a cell of a type the reference has labelled right, a cell of a type it lacks left
    unassigned (the accuracy, where the query has no such type). Without, it is the method's
    accuracy on held-out reference cells (the query cannot say more). Scores equal to 4 decimals are tied; a tie goes to the lower calibration
    error on held-out reference cells, then to the simpler method (projection, then classifier,
    then latent: fitted once with the map, then a trained classifier, then a trained VAE).
    """
    scored = table["accuracy"].notna().any() if "accuracy" in table else False
    if scored:
        novel = table["unassigned_novel"].notna().any()
        if novel:
            shared, new = table["n_shared_type_cells"], table["n_novel_type_cells"]
            score = (table["accuracy"] * shared + table["unassigned_novel"] * new) / (shared + new)
        else:
            score = table["accuracy"]
        rule = ("share of labelled query cells handled right (shared types labelled right, novel types "
                "left unassigned)" if novel else "accuracy on shared types")
    else:
        score, rule = table["heldout_accuracy"], "accuracy on held-out reference cells"
    simple = {m: i for i, m in enumerate(SIMPLEST_FIRST)}
    table = table.assign(score=score, _s=-score.round(4).fillna(-np.inf), _e=table["heldout_ece"].fillna(np.inf),
                         _m=table["method"].map(simple).fillna(len(simple)))
    table = table.sort_values(["_s", "_e", "_m"], kind="stable").drop(columns=["_s", "_e", "_m"])
    table.insert(4, "rank", np.arange(1, len(table) + 1))
    table["chosen"] = table["rank"] == 1
    return table, rule + "; ties: lower held-out calibration error, then the simpler method"


#: a mapping run's copies of its method's calibration metrics (atlas_calibrate's names)
HELDOUT_METRICS = {"heldout_accuracy": "heldout_accuracy", "heldout_ece_raw": "ece_raw", "heldout_ece": "ece",
                   "heldout_coverage": "coverage", "heldout_mean_set_size": "mean_set_size"}


#: the methods, simplest first (the last tie-break of :func:`rank_methods`)
SIMPLEST_FIRST = ("projection", "classifier", "latent")


#: the columns of an atlas comparison table (and of results/atlas.tsv)
COMPARISON_METRICS = ("accuracy", "assigned_accuracy", "forced_accuracy", "balanced_accuracy", "macro_f1",
                      "unassigned_fraction", "unassigned_shared", "unassigned_novel", "set_coverage", "mean_set_size",
                      "mean_confidence", "heldout_accuracy", "heldout_ece_raw", "heldout_ece", "heldout_coverage",
                      "n_cells", "n_shared_type_cells", "n_novel_type_cells", "n_shared_genes", "n_shared_hvg")
