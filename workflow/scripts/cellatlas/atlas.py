"""Atlas mapping: place query datasets on a reference's fitted map and transfer its labels.

The reference map is what the reference's own stages fitted, gathered once per atlas: its
genes with the means and standard deviations its PCA scaled them by, the PCA loadings, the
reference cells' PCA and UMAP coordinates and kNN graph, and, for the latent method, the VAE
latent space and its graph. Nothing of the reference is refitted for a query:

* projection: the query's log-normalized values are scaled with the reference's means and
  standard deviations and multiplied by the reference's loadings. A gene the query lacks
  counts as the reference mean, so it moves no cell. scanpy's ``Ingest`` places the cells in
  the reference UMAP (umap-learn's transform of the stored layout); an exact search finds
  their reference neighbours.
* latent: the query's counts are encoded by the reference's VAE; the query's batches are new
  to the model, so the encoder gets no batch code for them.
* classifier: the reference's best classify-stage model predicts the query's cells.

Confidence. For the two kNN methods it is agreement (the winning label's share of the k
reference neighbours) times proximity. Proximity asks whether the cell lies where reference
cells of its label lie: each label is a Gaussian in the representation (mean and Ledoit-Wolf
shrunk covariance, fitted once with the map), the cell's Mahalanobis distance to its label is
compared with the reference cells' own (out-of-fold) distances, and proximity is the share of
those reference cells at least as far, over 1% (so 1 inside the label's 99% envelope, falling
to 0 beyond its farthest cell). A query cell of a type the reference lacks lands among some
reference label's neighbours but outside that label's envelope. For the classifier the
confidence is the top class probability. Below ``min_confidence`` a cell is ``unassigned``
rather than forced into a reference type.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import AtlasError

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
METHODS = ("projection", "latent", "classifier")
#: var columns that hold stable gene ids (10x: gene_ids), tried in this order
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id")
#: obsm keys of the reference map and of a mapped query
PCA, UMAP, VAE, VAE_UMAP = "X_pca", "X_umap", "X_vae", "X_umap_vae"
#: obsp keys of the reference map's kNN graphs (distances) on the PCA and the VAE space
GRAPH = {PCA: "distances", VAE: "vae_distances"}
#: the share of a label's reference cells outside the envelope in which proximity is 1
TAIL = 0.01


# -- genes -----------------------------------------------------------------------------------------


def _id_column(var: pd.DataFrame) -> str | None:
    return next((c for c in ID_COLUMNS if c in var.columns), None)


def _strip_version(ids: pd.Index) -> pd.Index:
    """ENSG00000141510.17 -> ENSG00000141510 (annotation releases differ in versions only)."""
    return ids.str.replace(r"^(ENS[A-Z]*G\d+)\.\d+$", r"\1", regex=True)


@dataclass(frozen=True)
class GeneAlignment:
    """The query's genes in the reference's order."""

    key: str
    #: for each reference gene, the query's column (-1: the query lacks the gene)
    columns: np.ndarray

    @property
    def present(self) -> np.ndarray:
        return self.columns >= 0

    def n_shared(self, mask: np.ndarray | None = None) -> int:
        present = self.present if mask is None else self.present[mask]
        return int(present.sum())

    def matrix(self, X, fill: np.ndarray | None = None, row_scale: np.ndarray | None = None) -> sp.csr_matrix:
        """``X`` (query cells x query genes) as cells x reference genes.

        A missing gene is 0, or ``fill[gene]`` (times ``row_scale[cell]`` when given).
        """
        X = sp.csr_matrix(X, dtype=np.float32)
        n, g = X.shape[0], len(self.columns)
        present = np.flatnonzero(self.present)
        place = sp.csr_matrix((np.ones(len(present), dtype=np.float32), (np.arange(len(present)), present)),
                              shape=(len(present), g))
        out = (X[:, self.columns[present]] @ place).tocsr()
        missing = np.flatnonzero(~self.present)
        if fill is not None and len(missing):
            scale = np.ones(n) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
            values = np.outer(scale, np.asarray(fill, dtype=np.float64)[missing]).astype(np.float32)
            rows = np.repeat(np.arange(n), len(missing))
            cols = np.tile(missing, n)
            out = (out + sp.csr_matrix((values.ravel(), (rows, cols)), shape=(n, g))).tocsr()
        out.eliminate_zeros()
        return out


def align_genes(reference_var: pd.DataFrame, query_var: pd.DataFrame) -> GeneAlignment:
    """Match genes by stable id when both sides have ids (versions ignored), else by symbol."""
    rid, qid = _id_column(reference_var), _id_column(query_var)
    if rid and qid:
        rkeys = _strip_version(pd.Index(reference_var[rid].astype(str)))
        qkeys = _strip_version(pd.Index(query_var[qid].astype(str)))
        key = "gene id"
    else:
        rkeys, qkeys, key = pd.Index(reference_var.index.astype(str)), pd.Index(query_var.index.astype(str)), "symbol"
    first = pd.Series(np.arange(len(qkeys)), index=qkeys)
    first = first[~first.index.duplicated()]
    columns = first.reindex(rkeys).fillna(-1).astype(np.int64).to_numpy()
    return GeneAlignment(key=key, columns=columns)


def check_overlap(alignment: GeneAlignment, mask: np.ndarray, *, atlas: str, reference: str, query: str,
                  what: str, min_shared: int) -> int:
    """The number of ``mask``'s reference genes the query has; too few is an :class:`AtlasError`."""
    n = alignment.n_shared(mask)
    if n < min_shared:
        raise AtlasError(atlas, f"reference '{reference}' and query '{query}' share {n} of the {int(mask.sum())} genes "
                                f"{what} uses (matched by {alignment.key}); at least {min_shared} are needed "
                                "(atlas.min_shared_genes)")
    return n


# -- the reference map -----------------------------------------------------------------------------


#: labels with fewer reference cells get the pooled within-label covariance and distances
MIN_LABEL_CELLS = 10


def label_gaussians(rep: np.ndarray, labels: pd.Categorical, *, seed: int = 0, n_folds: int = 5):
    """Per label: mean and Ledoit-Wolf precision of ``rep``, and every cell's out-of-fold
    Mahalanobis distance to its own label (the reference distribution proximity is read from).

    Out-of-fold, because a cell that helped fit its label's covariance looks closer to it than a
    new cell would. A label with fewer than :data:`MIN_LABEL_CELLS` cells has too few to fit or
    to judge by: it gets the covariance pooled over every label (cells centred on their label's
    mean) and is judged against all cells' distances under that pooled model (``pooled``).
    Returns (means, precisions, null, pooled).
    """
    from sklearn.covariance import LedoitWolf

    rep = np.asarray(rep, dtype=np.float64)
    codes = np.asarray(labels.codes)
    L, d = len(labels.categories), rep.shape[1]
    means = np.stack([rep[codes == c].mean(axis=0) if (codes == c).any() else np.zeros(d) for c in range(L)])
    centred = rep - means[codes]
    pooled_fit = LedoitWolf(assume_centered=True).fit(centred)
    pooled = mahalanobis(centred, np.zeros(d), pooled_fit.precision_)
    precisions = np.repeat(pooled_fit.precision_[None], L, axis=0)
    null = pooled.copy()
    rng = np.random.default_rng(seed)
    for c in range(L):
        rows = np.flatnonzero(codes == c)
        if len(rows) < MIN_LABEL_CELLS:
            continue
        Z = rep[rows]
        precisions[c] = LedoitWolf().fit(Z).precision_
        fold = rng.permutation(len(rows)) % n_folds
        for f in range(n_folds):
            train = fold != f
            part = LedoitWolf().fit(Z[train])
            null[rows[~train]] = mahalanobis(Z[~train], part.location_, part.precision_)
    return means, precisions, null, pooled


def mahalanobis(X: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    D = np.asarray(X, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", D, precision, D), 0.0))


def proximity(distance: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of ``reference`` distances at least ``distance``, over :data:`TAIL`, capped at 1."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    at_least = (len(ref) - np.searchsorted(ref, distance, side="left")) / max(len(ref), 1)
    return np.minimum(1.0, at_least / TAIL)


def _add_label_models(out, rep: str, seed: int) -> None:
    labels = out.obs[keys.LABEL].cat
    have = np.asarray(out.obs[keys.LABEL].notna())
    means, precisions, null, pooled = label_gaussians(out.obsm[rep][have], pd.Categorical.from_codes(
        labels.codes[have], categories=labels.categories), seed=seed)
    for name, values in ((f"{rep}_mahalanobis", null), (f"{rep}_mahalanobis_pooled", pooled)):
        col = np.full(out.n_obs, np.nan)
        col[have] = values
        out.obs[name] = col
    out.uns[f"{rep}_label_means"], out.uns[f"{rep}_label_precisions"] = means, precisions


def build_reference(adata, *, atlas: str, reference: str, label_key: str, seed: int = 0):
    """The reference map of ``adata`` (the reference's embed.h5ad) as a compact AnnData.

    The map has no expression matrix: ``var`` holds each gene's mean and sd (log-normalized),
    ``highly_variable``, its id, and its mean share of a cell's counts; ``varm["PCs"]``; ``obs``
    the label; ``obsm`` the PCA and UMAP coordinates; ``obsp`` the kNN distances; ``uns`` the
    label Gaussians and the median library size.
    """
    import anndata as ad

    if label_key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns[:15]))
        raise AtlasError(atlas, f"reference '{reference}' has no obs column '{label_key}' "
                                f"(atlas.atlases.{atlas}.label_key; columns: {cols})")
    labels = adata.obs[label_key]
    if labels.nunique() < 2:
        raise AtlasError(atlas, f"reference '{reference}': label column '{label_key}' has {labels.nunique()} distinct "
                                "label(s); transferring labels needs at least 2")
    if UNASSIGNED in set(labels.dropna().astype(str)):
        raise AtlasError(atlas, f"reference '{reference}': label '{UNASSIGNED}' is reserved for cells the mapping "
                                "cannot assign")
    scaled = bool(adata.uns.get("pca", {}).get("params", {}).get("scale", True))
    from cellatlas.embed import gene_mean_sd

    mean, sd = gene_mean_sd(adata.X)
    var = pd.DataFrame({"mean": mean, "sd": sd if scaled else np.ones_like(sd),
                        "highly_variable": adata.var["highly_variable"].to_numpy(bool)}, index=adata.var_names.copy())
    if (idc := _id_column(adata.var)) is not None:
        var[idc] = adata.var[idc].astype(str).to_numpy()
    median_library = 0.0
    if keys.COUNTS_LAYER in adata.layers:
        counts = sp.csr_matrix(adata.layers[keys.COUNTS_LAYER], dtype=np.float64)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        median_library = float(np.median(lib))
        lib[lib == 0] = 1.0
        var["count_share"] = np.asarray(sp.diags(1.0 / lib).dot(counts).mean(axis=0)).ravel()
    obs = pd.DataFrame({keys.LABEL: pd.Categorical(labels.astype("string").astype(object).where(labels.notna(), None))},
                       index=adata.obs_names.copy())
    out = ad.AnnData(obs=obs, var=var, obsm={PCA: adata.obsm[PCA], UMAP: adata.obsm[UMAP]},
                     varm={"PCs": adata.varm["PCs"]})
    out.obsp[GRAPH[PCA]] = sp.csr_matrix(adata.obsp["distances"])
    _add_label_models(out, PCA, seed)
    neighbors = dict(adata.uns["neighbors"]["params"])
    out.uns["neighbors"] = {"n_neighbors": int(neighbors["n_neighbors"]), "random_state": int(neighbors.get("random_state", seed))}
    out.uns["umap"] = {k: float(v) for k, v in adata.uns["umap"]["params"].items() if k in ("a", "b")}
    out.uns["median_library"] = median_library
    summary: dict[str, Any] = {"n_cells": adata.n_obs, "n_genes": adata.n_vars, "n_hvg": int(var["highly_variable"].sum()),
                               "n_labels": int(labels.nunique()), "n_pcs": int(adata.obsm[PCA].shape[1])}
    out.uns[keys.UNS_KEY] = {"atlas_reference": {"atlas": atlas, "reference": reference, "label_key": label_key,
                                                 "summary": summary}}
    return out, summary


def build_reference_vae(ref, vae, *, atlas: str, reference: str, seed: int = 0):
    """The VAE part of the map: ``vae`` (the reference's train/vae embedding) with the map's
    labels, the latent space's kNN graph (as train_vae built its UMAP) and its label Gaussians.

    Kept apart from the PCA map, so that retraining the VAE reruns only the latent mappings.
    """
    import anndata as ad
    import scanpy as sc

    if not vae.obs_names.equals(ref.obs_names):
        raise AtlasError(atlas, f"reference '{reference}': the VAE embedding's cells differ from the reference map's")
    out = ad.AnnData(obs=ref.obs[[keys.LABEL]].copy(), obsm={VAE: vae.obsm[VAE], VAE_UMAP: vae.obsm[VAE_UMAP]})
    sc.pp.neighbors(out, n_neighbors=int(ref.uns["neighbors"]["n_neighbors"]), use_rep=VAE, random_state=seed)
    out.obsp[GRAPH[VAE]] = out.obsp.pop("distances")
    del out.obsp["connectivities"], out.uns["neighbors"]
    _add_label_models(out, VAE, seed)
    return out, {"n_cells": out.n_obs, "n_latent": int(vae.obsm[VAE].shape[1])}


def with_vae(ref, vae_map):
    """The map with its VAE part added (in memory)."""
    if not vae_map.obs_names.equals(ref.obs_names):
        raise ValueError("the VAE map's cells differ from the reference map's")
    ref = ref.copy()
    for key in (VAE, VAE_UMAP):
        ref.obsm[key] = vae_map.obsm[key]
    ref.obsp[GRAPH[VAE]] = vae_map.obsp[GRAPH[VAE]]
    for col in (f"{VAE}_mahalanobis", f"{VAE}_mahalanobis_pooled"):
        ref.obs[col] = vae_map.obs[col].to_numpy()
    for key in (f"{VAE}_label_means", f"{VAE}_label_precisions"):
        ref.uns[key] = vae_map.uns[key]
    return ref


# -- the three methods -----------------------------------------------------------------------------


def project(ref, X_aligned: sp.csr_matrix, present: np.ndarray) -> np.ndarray:
    """Query cells in the reference's PCA coordinates.

    ``X_aligned`` holds log-normalized values in the reference's gene order (0 where missing);
    ``present`` marks the genes the query has. A missing gene is treated as the reference mean.
    """
    hvg = ref.var["highly_variable"].to_numpy(bool)
    mean, sd = ref.var["mean"].to_numpy()[hvg], ref.var["sd"].to_numpy()[hvg]
    loadings = np.asarray(ref.varm["PCs"], dtype=np.float64)[hvg]
    keep = present[hvg]
    weights = loadings / sd[:, None]
    weights[~keep] = 0.0
    offset = (mean[keep] / sd[keep]) @ loadings[keep]
    Xh = sp.csr_matrix(X_aligned[:, hvg], dtype=np.float64)
    return np.asarray(Xh @ weights - offset, dtype=np.float32)


def _ingest(ref, rep: str, seed: int):
    """scanpy's Ingest over one of the map's representations (PCA or VAE) and its UMAP."""
    import anndata as ad
    from scanpy.tools import Ingest

    umap = UMAP if rep == PCA else VAE_UMAP
    k = int(ref.uns["neighbors"]["n_neighbors"])
    # a bare reference: Ingest then reads the representation from obsm instead of projecting
    # X itself (it would centre the query by the query's own mean)
    bare = ad.AnnData(obs=pd.DataFrame(index=ref.obs_names), obsm={"rep": ref.obsm[rep], "X_umap": ref.obsm[umap]})
    distances = sp.csr_matrix(ref.obsp[GRAPH[rep]])
    bare.obsp["distances"] = distances
    bare.obsp["connectivities"] = distances
    bare.uns["neighbors"] = {"params": {"n_neighbors": k, "metric": "euclidean", "use_rep": "rep", "random_state": seed},
                             "distances_key": "distances", "connectivities_key": "connectivities"}
    bare.uns["umap"] = {"params": {"a": ref.uns["umap"]["a"], "b": ref.uns["umap"]["b"], "random_state": seed}}
    return Ingest(bare)


def place_in_umap(ref, rep: str, query_rep: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The cells' coordinates in the reference UMAP of ``rep`` (umap-learn's transform via Ingest)."""
    import anndata as ad

    ing = _ingest(ref, rep, seed)
    query = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(query_rep.shape[0])]),
                       obsm={"rep": np.ascontiguousarray(query_rep, dtype=np.float32)})
    ing.fit(query)
    ing.map_embedding("umap")
    return np.asarray(ing._obsm["X_umap"], dtype=np.float32)


def knn_transfer(ref, rep: str, query_rep: np.ndarray, *, n_neighbors: int) -> pd.DataFrame:
    """Labels of ``query_rep``'s k nearest reference cells, with agreement and proximity
    (``best_label``, ``agreement``, ``proximity``, ``mahalanobis``)."""
    from sklearn.neighbors import NearestNeighbors

    # Exact neighbours for the vote: Ingest's own search (pynndescent, seeded from the reference
    # graph) returned wrong neighbours for 12% of a simulated query, exact search for none.
    k = min(int(n_neighbors), ref.n_obs)
    search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(np.asarray(ref.obsm[rep], dtype=np.float32))
    indices = search.kneighbors(np.asarray(query_rep, dtype=np.float32), return_distance=False)

    labels = ref.obs[keys.LABEL]
    codes = labels.cat.codes.to_numpy()
    categories = np.asarray(labels.cat.categories.astype(str))
    votes_of = codes[indices]
    votes = np.zeros((len(query_rep), len(categories)))
    rows = np.repeat(np.arange(len(query_rep)), votes_of.shape[1])
    ok = votes_of.ravel() >= 0  # an unlabelled reference cell votes for nothing
    np.add.at(votes, (rows[ok], votes_of.ravel()[ok]), 1.0)
    best = votes.argmax(axis=1)
    agreement = votes.max(axis=1) / votes_of.shape[1]

    means, precisions = ref.uns[f"{rep}_label_means"], ref.uns[f"{rep}_label_precisions"]
    null = ref.obs[f"{rep}_mahalanobis"].to_numpy()
    pooled = ref.obs[f"{rep}_mahalanobis_pooled"].to_numpy()
    distance = np.zeros(len(query_rep))
    near = np.zeros(len(query_rep))
    for c in np.unique(best):
        rows = best == c
        own = codes == c
        reference = null[own] if own.sum() >= MIN_LABEL_CELLS else pooled[np.isfinite(pooled)]
        distance[rows] = mahalanobis(query_rep[rows], means[c], precisions[c])
        near[rows] = proximity(distance[rows], reference)
    return pd.DataFrame({"best_label": categories[best], "agreement": agreement, "proximity": near,
                         "mahalanobis": distance})


def encode_latent(plan, counts: sp.csr_matrix) -> np.ndarray:
    """Posterior means of ``counts`` (cells x the VAE's genes) under the reference's VAE.

    The query's batches are not the model's: every cell gets the code past the last trained
    batch, which the encoder and decoder read as no batch (a zero one-hot).
    """
    from cellatlas.deep.data import CSRTensors, SparseBatches

    n_batches = int(plan.hparams.n_batches)
    codes = np.full(counts.shape[0], n_batches, dtype=np.int64) if n_batches else None
    every = SparseBatches(CSRTensors.from_scipy(sp.csr_matrix(counts, dtype=np.float32)), np.arange(counts.shape[0]),
                          covariate=codes, batch_size=4096)
    return plan.cpu().embed(every)


def classifier_transfer(model, X_aligned) -> pd.DataFrame:
    """The classify-stage pipeline's prediction: ``best_label`` and its probability."""
    proba = model.predict_proba(X_aligned)
    classes = np.asarray(model.classes_).astype(str)
    best = proba.argmax(axis=1)
    return pd.DataFrame({"best_label": classes[best], "probability": proba[np.arange(len(best)), best]})


def assign(table: pd.DataFrame, *, min_confidence: float) -> pd.DataFrame:
    """``confidence`` (agreement x proximity, or the probability) and ``predicted`` (or unassigned)."""
    out = table.copy()
    if "probability" in out:
        out["confidence"] = out["probability"]
    else:
        out["confidence"] = out["agreement"] * out["proximity"]
    out["predicted"] = np.where(out["confidence"] >= min_confidence, out["best_label"], UNASSIGNED)
    return out


# -- evaluation ------------------------------------------------------------------------------------


def evaluate(predicted: pd.Series, truth: pd.Series | None, reference_labels: Sequence[str]):
    """Scores of transferred labels against the query's own labels.

    Accuracy, balanced accuracy and macro-F1 are over the query cells whose label the
    reference has (an unassigned cell counts as wrong there); cells of other labels ("novel")
    should come out unassigned. Returns (metrics, per-label table, crosstab of predicted by
    query label); without query labels, only the assignment rates and an empty crosstab.
    """
    import sklearn.metrics as skm

    pred = predicted.astype(str).to_numpy()
    metrics: dict[str, float] = {"n_cells": float(len(pred)), "unassigned_fraction": float(np.mean(pred == UNASSIGNED))}
    if truth is None or truth.notna().sum() == 0:
        counts = pd.Series(pred).value_counts()
        return metrics, pd.DataFrame({"predicted": counts.index, "n_cells": counts.to_numpy()}), pd.DataFrame()
    labelled = truth.notna().to_numpy()
    true = truth.astype(str).to_numpy()
    ref = set(map(str, reference_labels))
    shared = labelled & np.isin(true, list(ref))
    novel = labelled & ~shared
    metrics.update({"n_shared_type_cells": float(shared.sum()), "n_novel_type_cells": float(novel.sum())})
    if shared.any():
        y, p = true[shared], pred[shared]
        present = np.unique(y)
        metrics.update({
            "accuracy": float(skm.accuracy_score(y, p)),
            "balanced_accuracy": float(skm.recall_score(y, p, labels=present, average="macro", zero_division=0)),
            "macro_f1": float(skm.f1_score(y, p, labels=present, average="macro", zero_division=0)),
            "unassigned_shared": float(np.mean(p == UNASSIGNED)),
        })
    if novel.any():
        metrics["unassigned_novel"] = float(np.mean(pred[novel] == UNASSIGNED))
    rows = []
    for label in sorted(np.unique(true[labelled])):
        sel = labelled & (true == label)
        p = pred[sel]
        top = pd.Series(p).value_counts()
        rows.append({"query_label": label, "in_reference": label in ref, "n_cells": int(sel.sum()),
                     "recall": float(np.mean(p == label)) if label in ref else np.nan,
                     "unassigned": float(np.mean(p == UNASSIGNED)),
                     "most_common": str(top.index[0]), "most_common_fraction": float(top.iloc[0] / sel.sum())})
    crosstab = pd.crosstab(pd.Series(true[labelled], name="query_label"), pd.Series(pred[labelled], name="predicted"))
    order = [c for c in sorted(reference_labels) if c in crosstab.columns] + \
            [c for c in crosstab.columns if c not in ref and c != UNASSIGNED] + \
            ([UNASSIGNED] if UNASSIGNED in crosstab.columns else [])
    return metrics, pd.DataFrame(rows), crosstab[order]


def agreement_between(labels: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Pairwise agreement of methods: share of cells with the same label, and Cohen's kappa."""
    from sklearn.metrics import cohen_kappa_score

    names = sorted(labels)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = labels[a].astype(str).to_numpy(), labels[b].astype(str).to_numpy()
            both = (x != UNASSIGNED) & (y != UNASSIGNED)
            rows.append({"method_a": a, "method_b": b, "same_label": float(np.mean(x == y)),
                         "kappa": float(cohen_kappa_score(x, y)) if len(set(x) | set(y)) > 1 else 1.0,
                         "both_assigned": float(np.mean(both)),
                         "same_label_when_both_assigned": float(np.mean(x[both] == y[both])) if both.any() else np.nan})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "same_label", "kappa", "both_assigned",
                                       "same_label_when_both_assigned"])


# -- the rules' jobs -------------------------------------------------------------------------------


def reference_job(*, embed: str, outputs: Mapping[str, str], atlas: str, reference: str, label_key: str,
                  seed: int = 0, run=None) -> dict[str, Any]:
    """The atlas_reference rule: gather the reference map once; plot it."""
    import anndata as ad

    from cellatlas import plotting

    adata = ad.read_h5ad(embed)
    ref, summary = build_reference(adata, atlas=atlas, reference=reference, label_key=label_key, seed=seed)
    ref.write_h5ad(outputs["h5ad"])
    plotting.embedding(ref.obsm[UMAP], {label_key: ref.obs[keys.LABEL]}, outputs["umap"], basis="UMAP",
                       title=f"atlas {atlas}: reference {reference} ({ref.n_obs} cells)")
    if run is not None:
        run.log_metrics(summary)
        run.log_artifact(outputs["umap"])
    return summary


def reference_vae_job(*, reference_map: str, vae: str, output: str, atlas: str, reference: str, seed: int = 0,
                      run=None) -> dict[str, Any]:
    """The atlas_reference_vae rule: the VAE part of the map, once per atlas."""
    import anndata as ad

    out, summary = build_reference_vae(ad.read_h5ad(reference_map), ad.read_h5ad(vae), atlas=atlas,
                                       reference=reference, seed=seed)
    out.write_h5ad(output)
    if run is not None:
        run.log_metrics(summary)
    return summary


def best_model(comparison: str) -> str:
    """The top-ranked model of a classify task's comparison table."""
    table = pd.read_csv(comparison, sep="\t")
    return str(table.sort_values("rank")["model"].iloc[0])


def _query_counts(q, median_library: float) -> sp.csr_matrix:
    """The query's counts. Log-normalized data have none: pseudo-counts ``expm1(X)``, each cell
    rescaled to the reference's median library size (the depth the VAE's encoder was trained at)."""
    if keys.COUNTS_LAYER in q.layers:
        return sp.csr_matrix(q.layers[keys.COUNTS_LAYER], dtype=np.float32)
    X = sp.csr_matrix(q.X, dtype=np.float64, copy=True)
    X.data = np.expm1(X.data)
    if median_library > 0:
        total = np.asarray(X.sum(axis=1)).ravel()
        total[total == 0] = 1.0
        X = sp.diags(median_library / total) @ X
    return sp.csr_matrix(X, dtype=np.float32)


#: cells per block where a query's missing genes are filled in (dense there)
BLOCK = 4096


def _blocks(n: int):
    for start in range(0, n, BLOCK):
        yield slice(start, min(start + BLOCK, n))


def map_query(ref, q, *, atlas: str, reference: str, query: str, method: str, n_neighbors: int = 15,
              min_confidence: float = 0.5, min_shared_genes: int = 100, seed: int = 0, vae_checkpoint: str | None = None,
              model=None):
    """Map ``q`` (the query's normalize.h5ad) onto the map ``ref`` with one method.

    Every method places the cells in the reference PCA (``obsm["X_atlas_pca"]``); projection and
    classifier in its UMAP (``X_atlas_umap``), latent in the VAE space and its UMAP instead
    (``X_atlas_vae``, ``X_atlas_umap_vae``). ``ref`` must hold the VAE part for the latent method. Returns the per-cell table (``predicted``,
    ``best_label``, ``confidence`` and the method's parts of it), the obsm entries and a
    summary of the gene alignment.
    """
    if method not in METHODS:
        raise AtlasError(atlas, f"unknown method '{method}' (methods: {', '.join(METHODS)})")
    where = {"atlas": atlas, "reference": reference, "query": query, "min_shared": min_shared_genes}
    align = align_genes(ref.var, q.var)
    hvg = ref.var["highly_variable"].to_numpy(bool)
    info: dict[str, Any] = {"gene_match": align.key, "n_shared_genes": align.n_shared(),
                            "n_shared_hvg": check_overlap(align, hvg, what="the reference PCA", **where)}
    pcs = project(ref, align.matrix(q.X), align.present)
    obsm = {"X_atlas_pca": pcs}
    if method == "latent":
        from cellatlas.deep.embedding import load_vae

        plan = load_vae(vae_checkpoint)
        genes = ref.var_names.get_indexer(pd.Index(plan.hparams.genes))
        if (genes < 0).any():
            raise AtlasError(atlas, f"reference '{reference}': the VAE checkpoint names genes the map lacks")
        sub = GeneAlignment(key=align.key, columns=align.columns[genes])
        info["n_shared_vae_genes"] = check_overlap(sub, np.ones(len(genes), bool), what="the VAE", **where)
        counts = _query_counts(q, float(ref.uns.get("median_library", 0.0)))
        share = ref.var["count_share"].to_numpy()[genes]
        # a gene the query lacks gets its reference share of the cell's counts
        lib = np.asarray(counts[:, sub.columns[sub.present]].sum(axis=1)).ravel() / max(share[sub.present].sum(), 1e-12)
        latent = np.vstack([encode_latent(plan, sub.matrix(counts[rows], fill=share, row_scale=lib[rows]))
                            for rows in _blocks(q.n_obs)])
        table = knn_transfer(ref, VAE, latent, n_neighbors=n_neighbors)
        obsm.update({"X_atlas_vae": latent, "X_atlas_umap_vae": place_in_umap(ref, VAE, latent, seed=seed)})
    else:
        obsm["X_atlas_umap"] = place_in_umap(ref, PCA, pcs, seed=seed)
        if method == "projection":
            table = knn_transfer(ref, PCA, pcs, n_neighbors=n_neighbors)
        else:
            n_features = getattr(model, "n_features_in_", ref.n_vars)
            if n_features != ref.n_vars:
                raise AtlasError(atlas, f"reference '{reference}': the classify model reads {n_features} genes, "
                                        f"the reference map has {ref.n_vars}")
            info["n_shared_model_genes"] = check_overlap(align, np.ones(ref.n_vars, bool), what="the classifier", **where)
            # a gene the query lacks is set to its reference mean
            fill = ref.var["mean"].to_numpy()
            table = pd.concat([classifier_transfer(model, align.matrix(q.X[rows], fill=fill))
                               for rows in _blocks(q.n_obs)], ignore_index=True)
    table = assign(table, min_confidence=min_confidence)
    table.index = q.obs_names
    return table, obsm, info


def map_job(*, reference_map: str, query_h5ad: str, outputs: Mapping[str, str], atlas: str, reference: str,
            query: str, method: str, mapping: Mapping[str, Any], seed: int = 0, reference_vae: str | None = None,
            vae_checkpoint: str | None = None, comparison: str | None = None, models: Mapping[str, str] | None = None,
            run=None) -> dict[str, Any]:
    """The atlas_map rule: map one query with one method, evaluate, plot, write every output."""
    import anndata as ad
    import joblib

    from cellatlas import plotting

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
    cells.to_csv(outputs["labels"], sep="\t")
    per_label.to_csv(outputs["per_label"], sep="\t", index=False)
    crosstab.to_csv(outputs["crosstab"], sep="\t")
    title = f"atlas {atlas}: {query} onto {reference}, {method}" + (f" ({chosen})" if chosen else "")
    plotting.crosstab(crosstab, outputs["crosstab_png"], title=title)
    umap_key = "X_atlas_umap_vae" if method == "latent" else "X_atlas_umap"
    ref_umap = ref.obsm[VAE_UMAP] if method == "latent" else ref.obsm[UMAP]
    plotting.joint_embedding(ref_umap, ref.obs[keys.LABEL], obsm[umap_key], table["predicted"],
                             table["confidence"].to_numpy(), outputs["umap"],
                             basis="UMAP (VAE)" if method == "latent" else "UMAP", title=title)

    out = ad.AnnData(X=q.X, obs=q.obs.copy(), var=q.var.copy(), obsm=obsm)
    for col, name in (("predicted", "atlas_label"), ("best_label", "atlas_best_label"), ("confidence", "atlas_confidence")):
        out.obs[name] = table[col].to_numpy()
    out.obs["atlas_label"] = out.obs["atlas_label"].astype("category")
    out.uns[keys.UNS_KEY] = {**q.uns.get(keys.UNS_KEY, {}), "atlas": {
        "atlas": atlas, "reference": reference, "method": method, "model": chosen, **dict(mapping), **info}}
    out.write_h5ad(outputs["h5ad"])

    summary: dict[str, Any] = {**metrics, **info, "mean_confidence": float(table["confidence"].mean())}
    if chosen:
        summary["model"] = chosen
    log.info("atlas %s, query %s, method %s: %s", atlas, query, method, summary)
    if run is not None:
        run.log_metrics(summary)
        if chosen:
            run.log_params({"best_model": chosen})
        for key in ("labels", "per_label", "crosstab", "crosstab_png", "umap"):
            run.log_artifact(outputs[key])
    return summary


def compare_job(*, records: Mapping[str, str], labels: Mapping[str, str], outputs: Mapping[str, str], atlas: str,
                reference: str, query: str, run=None) -> pd.DataFrame:
    """The atlas_compare rule: the methods side by side, and how often they agree."""
    import json
    from pathlib import Path

    rows = []
    for method in sorted(records):
        rec = json.loads(Path(records[method]).read_text())
        rows.append({"atlas": atlas, "reference": reference, "query": query, "method": method,
                     "model": rec["params"].get("best_model", ""), **{k: rec["metrics"].get(k, np.nan) for k in COMPARISON_METRICS}, "run_id": rec["run_id"]})
    table = pd.DataFrame(rows)
    table.to_csv(outputs["table"], sep="\t", index=False)
    per_cell = {m: pd.read_csv(p, sep="\t", index_col=0)["predicted"] for m, p in labels.items()}
    agree = agreement_between(per_cell)
    agree.to_csv(outputs["agreement"], sep="\t", index=False)
    if run is not None:
        for key in ("table", "agreement"):
            run.log_artifact(outputs[key])
        for row in agree.itertuples():
            run.log_metrics({f"same_label_{row.method_a}_{row.method_b}": row.same_label})
    return table


#: the columns of an atlas comparison table (and of results/atlas.tsv)
COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "unassigned_fraction", "unassigned_shared",
                      "unassigned_novel", "mean_confidence", "n_cells", "n_shared_type_cells", "n_novel_type_cells",
                      "n_shared_genes", "n_shared_hvg")
