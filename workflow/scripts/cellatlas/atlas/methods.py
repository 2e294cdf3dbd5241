"""The three mapping methods (projection, latent, classifier), the confidence and the unassigned call."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import AtlasError

from cellatlas.atlas import GRAPH, METHODS, PCA, UMAP, UNASSIGNED, VAE, VAE_UMAP
from cellatlas.atlas.calibration import N_FOLDS, Calibration, HeldOut, heldout_folds, label_sets, sample
from cellatlas.atlas.genes import GeneAlignment, align_genes, check_overlap
from cellatlas.atlas.reference import MIN_LABEL_CELLS, mahalanobis, proximity

log = logging.getLogger(__name__)


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


class ExactSearch:
    """Exact Euclidean neighbours among the reference cells, through the one method umap-learn's
    ``transform`` calls on its search index (pynndescent's ``query``).

    pynndescent's index cannot be cached by numba ("uses dynamic globals"): building and querying
    it compiled for about 40 s in every mapping job, whatever the data's size
    (benchmarks/job_costs.py). The label vote (:func:`knn_transfer`) searches with it too; exact
    search is deterministic.
    """

    _angular_trees = False  # umap-learn reads it to choose pynndescent's search epsilon

    def __init__(self, data: np.ndarray):
        from sklearn.neighbors import NearestNeighbors

        self._search = NearestNeighbors(algorithm="brute").fit(np.asarray(data, dtype=np.float32))

    def query(self, X: np.ndarray, k: int = 10, epsilon: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self._search.kneighbors(np.asarray(X, dtype=np.float32), n_neighbors=k)
        return indices.astype(np.int32), distances.astype(np.float32)


def _ingest(ref, rep: str, seed: int, *, exact: bool = True):
    """scanpy's Ingest over one of the map's representations (PCA or VAE) and its UMAP, searching
    the reference exactly (:class:`ExactSearch`) instead of with a pynndescent index (``exact``
    False: scanpy's own index, which benchmarks/job_costs.py measures beside it)."""
    import anndata as ad
    from scanpy.tools import Ingest

    class ExactIngest(Ingest):
        def _init_pynndescent(self, distances):
            self._nnd_idx = ExactSearch(self._rep)

        def _init_umap(self, adata):
            super()._init_umap(adata)
            self._umap._small_data = False  # one path at every size: the search above, not umap's own

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
    return (ExactIngest if exact else Ingest)(bare)


def place_in_umap(ref, rep: str, query_rep: np.ndarray, *, seed: int = 0, exact: bool = True) -> np.ndarray:
    """The cells' coordinates in the reference UMAP of ``rep`` (umap-learn's transform via Ingest)."""
    import anndata as ad

    ing = _ingest(ref, rep, seed, exact=exact)
    query = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(query_rep.shape[0])]),
                       obsm={"rep": np.ascontiguousarray(query_rep, dtype=np.float32)})
    ing.fit(query)
    ing.map_embedding("umap")
    return np.asarray(ing._obsm["X_umap"], dtype=np.float32)


def vote_shares(neighbour_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Each row's share of its neighbours per label (an unlabelled neighbour, code -1, votes for none)."""
    n, k = neighbour_codes.shape
    votes = np.zeros((n, n_labels))
    rows = np.repeat(np.arange(n), k)
    ok = neighbour_codes.ravel() >= 0
    np.add.at(votes, (rows[ok], neighbour_codes.ravel()[ok]), 1.0)
    return votes / k


def knn_transfer(ref, rep: str, query_rep: np.ndarray, *, n_neighbors: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels of ``query_rep``'s k nearest reference cells, with agreement and proximity
    (``best_label``, ``agreement``, ``proximity``, ``mahalanobis``; ``distance``, the mean
    distance to the k neighbours), and the vote shares (cells x the reference's labels)."""
    # Exact neighbours for the vote: Ingest's own search (pynndescent, seeded from the reference
    # graph) returned wrong neighbours for 12% of a simulated query, exact search for none.
    indices, distances = ExactSearch(ref.obsm[rep]).query(query_rep, k=min(int(n_neighbors), ref.n_obs))

    labels = ref.obs[keys.LABEL]
    codes = labels.cat.codes.to_numpy()
    categories = np.asarray(labels.cat.categories.astype(str))
    votes = vote_shares(codes[indices], len(categories))
    best = votes.argmax(axis=1)
    agreement = votes.max(axis=1)

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
                         "mahalanobis": distance, "distance": distances.mean(axis=1)}), votes


def heldout_knn(ref, rep: str, *, n_neighbors: int, seed: int = 0) -> HeldOut:
    """The reference's held-out cells for a kNN method: each labelled by the reference cells of
    the other folds (folds grouped by the map's ``group``, its donors or batches, where it has one).

    Each held-out cell is also labelled once more as if its type were new (``left_out``): by the
    other folds' cells of every other type, so the leave-one-type-out check costs one more search
    of the same size. The map's space itself (PCA or VAE) was fitted with every type.
    """
    labels = ref.obs[keys.LABEL]
    fold, held = heldout_folds(labels, ref.obs["group"] if "group" in ref.obs else None, seed=seed)
    codes = labels.cat.codes.to_numpy()
    categories = np.asarray(labels.cat.categories.astype(str))
    X = np.asarray(ref.obsm[rep], dtype=np.float32)

    def vote(test: np.ndarray, train: np.ndarray, f) -> pd.DataFrame:
        indices, distances = ExactSearch(X[train]).query(X[test], k=min(int(n_neighbors), len(train)))
        votes = vote_shares(codes[train][indices], len(categories))
        part = pd.DataFrame({"label": categories[codes[test]], "fold": f, "best_label": categories[votes.argmax(axis=1)],
                             "confidence": votes.max(axis=1), "distance": distances.mean(axis=1)},
                            index=ref.obs_names[test])
        return pd.concat([part, pd.DataFrame(votes, index=part.index, columns=[f"score_{c}" for c in categories])],
                         axis=1)

    parts, left_out = [], []
    for f in np.unique(fold[held]):
        test = np.flatnonzero(held & (fold == f))
        # unlabelled cells (fold -1) stay among the neighbours, voting for none, as for a query cell
        train = np.flatnonzero(fold != f)
        parts.append(vote(test, train, f))
        for c in np.unique(codes[test]):
            others = train[codes[train] != c]
            if len(others):
                left_out.append(vote(test[codes[test] == c], others, f))
    table = pd.concat(parts).loc[ref.obs_names[held]]
    table.index.name = "cell"
    lo = pd.concat(left_out) if left_out else table.iloc[:0]
    lo.index.name = "cell"
    return HeldOut(table, left_out=lo)


def neighbour_distance(ref, rep: str, query_rep: np.ndarray, *, n_neighbors: int, exclude=None) -> np.ndarray:
    """Mean distance of each cell to its k nearest reference cells (leaving out the reference cells ``exclude`` marks)."""
    keep = np.ones(ref.n_obs, bool) if exclude is None else ~np.asarray(exclude, bool)
    _, distances = ExactSearch(np.asarray(ref.obsm[rep])[keep]).query(query_rep, k=min(int(n_neighbors), int(keep.sum())))
    return distances.mean(axis=1)


def heldout_classifier(predictions: pd.DataFrame, ref, *, n_neighbors: int, seed: int = 0) -> HeldOut:
    """The classifier's held-out cells: the classify stage's out-of-fold predictions (its folds;
    seeded random folds where the task has one test fold, as the batches split does), at most
    :data:`~cellatlas.atlas.calibration.MAX_HELDOUT` of them, with each cell's distance to the
    reference cells outside its fold in the map's PCA. ``predictions`` must hold its labels as text."""
    oof = predictions[(predictions["source"] == "out_of_fold") & predictions["cell"].astype(str).isin(ref.obs_names)]
    oof = oof.iloc[sample(oof["target"].astype(str).to_numpy(), seed=seed)]
    probs = [c for c in oof.columns if c.startswith("prob_")]
    classes = np.asarray([c[len("prob_"):] for c in probs])
    P = oof[probs].to_numpy(dtype=np.float64)
    fold = oof["test_fold"].to_numpy()
    if len(np.unique(fold)) < 2:
        fold = np.random.default_rng(seed).permutation(len(oof)) % N_FOLDS
    table = pd.DataFrame({"label": oof["target"].astype(str).to_numpy(), "fold": fold,
                          "best_label": classes[P.argmax(axis=1)], "confidence": P.max(axis=1)},
                         index=pd.Index(oof["cell"].astype(str).to_numpy(), name="cell"))
    pcs = np.asarray(ref.obsm[PCA])
    table["distance"] = np.nan
    for f in np.unique(table["fold"]):
        cells = table.index[table["fold"] == f]
        rows = ref.obs_names.get_indexer(cells)
        table.loc[cells, "distance"] = neighbour_distance(ref, PCA, pcs[rows], n_neighbors=n_neighbors,
                                                          exclude=ref.obs_names.isin(cells))
    return HeldOut(pd.concat([table, pd.DataFrame(P, index=table.index, columns=[f"score_{c}" for c in classes])], axis=1))


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


def classifier_transfer(model, X_aligned) -> tuple[pd.DataFrame, np.ndarray]:
    """The classify-stage pipeline's prediction: ``best_label`` and its probability; the class
    probabilities (cells x ``model.classes_``)."""
    proba = model.predict_proba(X_aligned)
    classes = np.asarray(model.classes_).astype(str)
    best = proba.argmax(axis=1)
    return pd.DataFrame({"best_label": classes[best], "probability": proba[np.arange(len(best)), best]}), proba


def assign(table: pd.DataFrame, scores: np.ndarray, *, min_confidence: float,
           calibration: Calibration | None = None, novelty_alpha: float = 0.01) -> pd.DataFrame:
    """``confidence``, the prediction set, ``support``, ``typicality`` and ``predicted`` (or unassigned).

    ``confidence`` is the calibrated chance that ``best_label`` is right (without a calibration,
    the raw agreement or probability, kept as ``raw_confidence``); ``scores`` (cells x the
    calibration's classes) give the prediction sets and the best label's support. A cell is
    unassigned when its confidence, times its proximity for the kNN methods, is below
    ``min_confidence``; or when its best label's support or its typicality is below
    ``novelty_alpha``: its neighbours (or its classifier) back its best label less than the true
    label of all but that share of the held-out cells of that type, or it is farther from its
    nearest reference cells than all but that share of the held-out cells.
    """
    out = table.copy()
    out["raw_confidence"] = out["probability"] if "probability" in out else out["agreement"]
    weak = np.zeros(len(out), bool)
    if calibration is None:
        out["confidence"] = out["raw_confidence"]
    else:
        applied = calibration.apply(out["raw_confidence"].to_numpy(), scores, out["distance"].to_numpy())
        out["confidence"], out["support"], out["typicality"] = applied.calibrated, applied.support, applied.typicality
        out["label_set"] = label_sets(applied.sets, np.asarray(calibration.classes))
        out["set_size"] = applied.sets.sum(axis=1)
        weak = (applied.support < novelty_alpha) | (applied.typicality < novelty_alpha)
    trust = out["confidence"] * out["proximity"] if "proximity" in out else out["confidence"]
    out["predicted"] = np.where((trust >= min_confidence) & ~weak, out["best_label"], UNASSIGNED)
    return out


def _in_order(scores: np.ndarray, classes, order) -> np.ndarray:
    """``scores``' columns (``classes``) in ``order``; 0 for a class it lacks."""
    index = {str(c): j for j, c in enumerate(classes)}
    out = np.zeros((scores.shape[0], len(order)))
    for i, c in enumerate(order):
        if str(c) in index:
            out[:, i] = scores[:, index[str(c)]]
    return out


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
              model=None, calibration: Calibration | None = None, novelty_alpha: float = 0.01):
    """Map ``q`` (the query's normalize.h5ad) onto the map ``ref`` with one method.

    Every method places the cells in the reference PCA (``obsm["X_atlas_pca"]``); projection and
    classifier in its UMAP (``X_atlas_umap``), latent in the VAE space and its UMAP instead
    (``X_atlas_vae``, ``X_atlas_umap_vae``). ``ref`` must hold the VAE part for the latent method. Returns the per-cell table (``predicted``,
    ``best_label``, ``confidence`` and the method's parts of it, and with a ``calibration`` the
    prediction sets), the obsm entries and a summary of the gene alignment.
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
        table, scores = knn_transfer(ref, VAE, latent, n_neighbors=n_neighbors)
        obsm.update({"X_atlas_vae": latent, "X_atlas_umap_vae": place_in_umap(ref, VAE, latent, seed=seed)})
    else:
        obsm["X_atlas_umap"] = place_in_umap(ref, PCA, pcs, seed=seed)
        if method == "projection":
            table, scores = knn_transfer(ref, PCA, pcs, n_neighbors=n_neighbors)
        else:
            n_features = getattr(model, "n_features_in_", ref.n_vars)
            if n_features != ref.n_vars:
                raise AtlasError(atlas, f"reference '{reference}': the classify model reads {n_features} genes, "
                                        f"the reference map has {ref.n_vars}")
            info["n_shared_model_genes"] = check_overlap(align, np.ones(ref.n_vars, bool), what="the classifier", **where)
            # a gene the query lacks is set to its reference mean
            fill = ref.var["mean"].to_numpy()
            parts = [classifier_transfer(model, align.matrix(q.X[rows], fill=fill)) for rows in _blocks(q.n_obs)]
            table = pd.concat([t for t, _ in parts], ignore_index=True)
            table["distance"] = neighbour_distance(ref, PCA, pcs, n_neighbors=n_neighbors)
            scores = np.vstack([p for _, p in parts])
    if calibration is not None:
        # the kNN methods' scores are over the reference's labels, the classifier's over its classes
        classes = np.asarray(model.classes_).astype(str) if method == "classifier" else ref.obs[keys.LABEL].cat.categories
        scores = _in_order(scores, classes, calibration.classes)
    table = assign(table, scores, min_confidence=min_confidence, calibration=calibration, novelty_alpha=novelty_alpha)
    table.index = q.obs_names
    return table, obsm, info
