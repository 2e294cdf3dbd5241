"""scIB's metrics of an integration (computed by ``scib-metrics``), their aggregates, and the choice.

Every kNN-based metric reads one neighbour search: exact neighbours of the embedding, or for a
graph method (BBKNN) the nearest cells by shortest path along the graph, as scIB scores graph
outputs. Embedding-only metrics (BRAS, PCR, label silhouette, isolated labels) are NaN for a
graph, and the aggregates are means over the metrics a method has, as in scIB. The scores are
not min-max scaled across methods (scib-metrics' Benchmarker default): a method's score then
does not move when another method is added, changed or dropped.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.naming import INTEGRATION_BATCH as BATCH_METRICS
from cellatlas.naming import INTEGRATION_BIO as BIO_METRICS
#: scIB's weights of the overall score
BATCH_WEIGHT, BIO_WEIGHT = 0.4, 0.6
#: neighbours per cell for LISI (scib-metrics' Benchmarker: 90), kBET (50) and the rest (15)
K_LISI, K_KBET, K_SMALL = 90, 50, 15


def embedding_neighbors(X: np.ndarray, k: int):
    """Exact Euclidean k nearest neighbours of every cell, itself first (``NeighborsResults``)."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    k = min(k, X.shape[0])
    distances, indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return NeighborsResults(indices=indices, distances=distances)


#: up to this many cells of one label, kBET's neighbour search inside a label is exact
#: (scikit-learn); above, scib-metrics' own pynndescent. pynndescent's compiled code cannot be
#: cached by numba ("uses dynamic globals"), so it was compiled again in every integrate job
#: (~17 s); exact search on the diffusion map of 20,000 cells takes a few seconds.
KBET_EXACT_MAX_CELLS = 20_000


def kbet_per_label(nn, batches: np.ndarray, labels: np.ndarray) -> float:
    """scib-metrics' ``kbet_per_label``, its neighbour search within each label exact up to
    :data:`KBET_EXACT_MAX_CELLS` cells (scib-metrics takes no search to use: it is swapped in
    for the call and restored). A label asking for more neighbours than it has cells (10 cells,
    scib-metrics' smallest) gets all of them, where pynndescent would leave a slot unfilled."""
    import scib_metrics
    from scib_metrics import nearest_neighbors

    approximate = nearest_neighbors.pynndescent

    def search(X, n_neighbors: int, random_state: int = 0, n_jobs: int = 1):
        if X.shape[0] > KBET_EXACT_MAX_CELLS:
            return approximate(X, n_neighbors=n_neighbors, random_state=random_state, n_jobs=n_jobs)
        return embedding_neighbors(X, n_neighbors)

    nearest_neighbors.pynndescent = search
    try:
        return float(scib_metrics.kbet_per_label(nn, batches, labels))
    finally:
        nearest_neighbors.pynndescent = approximate


def _k_nearest_paths(indptr, indices, data, k):
    """Dijkstra from every cell, stopped once ``k`` cells are settled (itself first)."""
    n = len(indptr) - 1
    out_i = np.empty((n, k), dtype=np.int64)
    out_d = np.empty((n, k), dtype=np.float64)
    stamp = np.zeros(n, dtype=np.int64)
    for s in range(n):
        heap = [(0.0, s)]
        count = 0
        while len(heap) > 0 and count < k:
            d, u = heapq.heappop(heap)
            if stamp[u] == s + 1:
                continue
            stamp[u] = s + 1
            out_i[s, count] = u
            out_d[s, count] = d
            count += 1
            for p in range(indptr[u], indptr[u + 1]):
                v = indices[p]
                if stamp[v] != s + 1:
                    heapq.heappush(heap, (d + data[p], v))
        for c in range(count, k):  # a component smaller than k: repeat its farthest cell
            out_i[s, c] = out_i[s, count - 1]
            out_d[s, c] = out_d[s, count - 1]
    return out_i, out_d


_compiled = None


def shortest_path_neighbors(graph: sp.spmatrix, k: int):
    """The ``k`` cells nearest to each cell along a kNN graph of distances (made symmetric), itself
    first: how scIB gives a graph method as many neighbours as an embedding gets."""
    global _compiled
    from scib_metrics.nearest_neighbors import NeighborsResults

    if _compiled is None:
        import numba

        _compiled = numba.njit(cache=True)(_k_nearest_paths)
    g = sp.csr_matrix(graph, dtype=np.float64)
    g = g.maximum(g.T).tocsr()
    g.sort_indices()
    k = min(k, g.shape[0])
    indices, distances = _compiled(g.indptr.astype(np.int64), g.indices.astype(np.int64), g.data, k)
    return NeighborsResults(indices=indices, distances=distances)


def aggregate(row: dict, metrics: tuple[str, ...] = (*BATCH_METRICS, *BIO_METRICS)) -> dict:
    """``batch_correction`` and ``bio_conservation`` (means of the ``metrics`` present) and ``total``."""
    batch = [row[m] for m in BATCH_METRICS if m in metrics and _finite(row.get(m))]
    bio = [row[m] for m in BIO_METRICS if m in metrics and _finite(row.get(m))]
    out = {"batch_correction": float(np.mean(batch)) if batch else math.nan,
           "bio_conservation": float(np.mean(bio)) if bio else math.nan}
    out["total"] = (BATCH_WEIGHT * out["batch_correction"] + BIO_WEIGHT * out["bio_conservation"]
                    if bio and batch else math.nan)
    return out


def _finite(value) -> bool:
    return value is not None and np.isfinite(value)


def score(*, labels: np.ndarray | None, batches: np.ndarray, embedding: np.ndarray | None = None,
          graph: sp.spmatrix | None = None, unintegrated: np.ndarray | None = None, seed: int = 0) -> dict:
    """scIB's metrics of one embedding or graph, and their aggregates (:func:`aggregate`).

    ``labels`` None: the biology metrics and the per-label batch metrics (kBET, graph
    connectivity, BRAS) are NaN. ``unintegrated``: the PCA, for PCR comparison.
    """
    import scib_metrics

    if (embedding is None) == (graph is None):
        raise ValueError("score one embedding or one graph")
    batches = np.asarray(batches).astype(str)
    nn = (embedding_neighbors(np.asarray(embedding, dtype=np.float32), K_LISI) if graph is None
          else shortest_path_neighbors(graph, K_LISI))
    row: dict = {m: math.nan for m in (*BATCH_METRICS, *BIO_METRICS)}
    row["ilisi"] = float(scib_metrics.ilisi_knn(nn, batches))
    if embedding is not None and unintegrated is not None:
        row["pcr"] = float(scib_metrics.pcr_comparison(unintegrated, embedding, batches, categorical=True))
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        row["kbet"] = kbet_per_label(nn.subset_neighbors(K_KBET), batches, labels)
        row["graph_connectivity"] = float(scib_metrics.graph_connectivity(nn.subset_neighbors(K_SMALL), labels))
        row["clisi"] = float(scib_metrics.clisi_knn(nn, labels))
        clusters = scib_metrics.nmi_ari_cluster_labels_leiden(nn.subset_neighbors(K_SMALL), labels, seed=seed)
        row["nmi"], row["ari"] = float(clusters["nmi"]), float(clusters["ari"])
        if embedding is not None:
            row["bras"] = float(scib_metrics.bras(embedding, labels, batches))
            row["label_asw"] = float(scib_metrics.silhouette_label(embedding, labels))
            row["isolated_labels"] = float(scib_metrics.isolated_labels(embedding, labels, batches))
    row.update(aggregate(row))
    return row


def common_total(table: pd.DataFrame) -> pd.Series:
    """Each method's overall score over the metrics every method that ran has: a graph method
    lacks the embedding metrics, and a mean over fewer metrics is not comparable (scIB's tables
    mix them; the choice does not)."""
    ok = table[table["status"] == "ok"]
    shared = tuple(m for m in (*BATCH_METRICS, *BIO_METRICS) if m in table and ok[m].notna().all() and len(ok))
    return table.apply(lambda r: aggregate(r.to_dict(), shared)["total"], axis=1)


def choose(table: pd.DataFrame, *, use: str, max_bio_loss: float, order: tuple[str, ...]) -> tuple[str, str]:
    """The method the clusters and maps use, and why.

    ``table``: one row per method (``method``, ``status``, ``n_batches``, ``total``,
    ``bio_conservation``, and ``total_common`` where :func:`common_total` made it). ``use`` a
    method name takes that method if it ran. ``best``: among the methods that ran and keep
    biology within ``max_bio_loss`` of the unintegrated PCA's conservation, the highest overall
    score (over the shared metrics when there is ``total_common``); ties (to 4 decimals) go to the simpler method
    (earlier in ``order``). One batch, or no labels to score biology with: the PCA.
    """
    from cellatlas.integrate import BASELINE, LEARNS_LABELS

    ok = table[table["status"] == "ok"].set_index("method")
    if use != "best":
        if use not in ok.index:
            status = table.set_index("method")["status"].get(use, "not run")
            return BASELINE, f"integration.use is '{use}', which did not give a result ({status}): the unintegrated PCA"
        return use, f"integration.use is '{use}'"
    if int(table["n_batches"].max()) < 2:
        return BASELINE, "one batch: nothing to integrate"
    if BASELINE not in ok.index or not _finite(ok.loc[BASELINE, "bio_conservation"]):
        return BASELINE, ("no labels to score biology with: 'best' cannot tell a method that removes batches from "
                          "one that also removes cell types; set integration.use to a method to use it")
    floor = ok.loc[BASELINE, "bio_conservation"] - max_bio_loss
    learned = sorted(set(ok.index) & set(LEARNS_LABELS))
    ok = ok.drop(index=learned)
    kept = ok[ok["bio_conservation"] >= floor - 1e-12]
    dropped = sorted(set(ok.index) - set(kept.index))
    by = "total_common" if "total_common" in kept else "total"
    rank = pd.DataFrame({"total": kept[by].round(4), "order": [order.index(m) for m in kept.index]},
                        index=kept.index).sort_values(["total", "order"], ascending=[False, True])
    best = str(rank.index[0])
    reason = (f"best overall scIB score ({ok.loc[best, by]:.4f}: 0.4 x batch correction + 0.6 x biological "
              f"conservation{', over the metrics every method has' if by == 'total_common' else ''}) among methods "
              f"keeping biology within {max_bio_loss:g} of the unintegrated PCA's")
    if len(rank) > 1 and rank["total"].iloc[0] == rank["total"].iloc[1]:
        reason += f"; tied with '{rank.index[1]}', the simpler method taken"
    if dropped:
        reason += f"; excluded for losing biology: {', '.join(dropped)}"
    if learned:
        reason += f"; not ranked, having learned the labels it is scored on: {', '.join(learned)}"
    return best, reason
