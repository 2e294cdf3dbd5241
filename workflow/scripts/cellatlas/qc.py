"""Quality control: per-cell metrics, fixed or MAD-based thresholds, doublet scores.

Thresholds that need counts (total counts, mitochondrial fraction, doublets) are only
applied when ``X`` holds counts; on already-normalized input they are skipped and the
record says why, rather than computed on numbers that do not mean what they claim.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellatlas import keys
from cellatlas.errors import InputDataError

log = logging.getLogger(__name__)

MITO_PREFIXES = ("MT-", "mt-")
RIBO_PREFIXES = ("RPS", "RPL", "Rps", "Rpl")


def compute_metrics(adata, block: int | None = None) -> None:
    """Add scanpy's QC metrics: per cell ``total_counts``, ``n_genes_by_counts``, ``pct_counts_mt``,
    ``pct_counts_ribo`` (and the totals), per gene ``n_cells_by_counts``, ``mean_counts``,
    ``pct_dropout_by_counts``, ``total_counts``.

    A CSR matrix of more than ``block`` cells (default :data:`BLOCK`) is described block by block
    of cells: scanpy counts each gene's cells with scipy's ``getnnz(axis=0)``, which copies the
    whole indices array as int64 (a million cells: 9.6 GB on top of the matrix). The cells'
    metrics are scanpy's on each block, the same numbers; the genes' are scanpy's block totals
    summed (counts exact; totals summed in float64 where scanpy keeps one float32 running sum, so
    the last bits differ).
    """
    import scanpy as sc
    import scipy.sparse as sp

    block = BLOCK if block is None else block
    if block < 1:
        raise ValueError(f"block must be a positive number of cells, not {block}")
    adata.var["mt"] = adata.var_names.str.startswith(MITO_PREFIXES)
    adata.var["ribo"] = adata.var_names.str.startswith(RIBO_PREFIXES)
    X = adata.X
    if not (sp.issparse(X) and X.format == "csr") or X.shape[0] <= block:
        sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True)
        return
    import anndata as ad

    flags = adata.var[["mt", "ribo"]]
    obs, n_cells, totals = [], np.zeros(X.shape[1], dtype=np.int64), np.zeros(X.shape[1], dtype=np.float64)
    for r0 in range(0, X.shape[0], block):
        cells, genes = sc.pp.calculate_qc_metrics(ad.AnnData(X[r0:r0 + block], var=flags), qc_vars=["mt", "ribo"],
                                                  percent_top=None, log1p=False, inplace=False)
        obs.append(cells)
        n_cells += genes["n_cells_by_counts"].to_numpy()
        totals += genes["total_counts"].to_numpy()
    obs = pd.concat(obs)
    obs.index = adata.obs_names
    adata.obs[obs.columns] = obs
    n = X.shape[0]
    adata.var["n_cells_by_counts"] = n_cells
    adata.var["mean_counts"] = totals / n
    adata.var["pct_dropout_by_counts"] = (1 - n_cells / n) * 100
    # scanpy's sum keeps a float matrix's dtype and widens integers
    adata.var["total_counts"] = totals.astype(X.dtype if X.dtype.kind == "f" else np.int64)


def mad_bounds(x: np.ndarray, nmads: float, *, lower: bool = True, upper: bool = True) -> tuple[float, float]:
    """Median +- ``nmads`` median absolute deviations (unscaled MAD), one side optional.

    Missing values (the mitochondrial share of a cell without counts) are left out of both
    medians; such cells are outside any bound (:func:`outside`)."""
    med = float(np.nanmedian(x))
    mad = float(np.nanmedian(np.abs(x - med)))
    lo = med - nmads * mad if lower else -np.inf
    hi = med + nmads * mad if upper else np.inf
    return lo, hi


#: the ``group`` of the dataset-wide bounds in the thresholds table
ALL = "all"


def _from_log(bounds: tuple[float, float]) -> tuple[float, float]:
    """Log-scale bounds back on the counts' scale, a few ulps outward: expm1(log1p(8)) is not
    always 8, and a group whose cells all have 8 genes (MAD 0) must not lose them to rounding."""
    lo, hi = np.expm1(bounds[0]), np.expm1(bounds[1])
    return float(lo - 1e-9 * abs(lo)), float(hi + 1e-9 * abs(hi))


def _mad_rows(obs: pd.DataFrame, *, nmads: float, nmads_mt: float, counts: bool, cap: float | None) -> list[tuple]:
    """MAD bounds of ``obs``'s cells: genes and counts on the log scale, both tails; the
    mitochondrial share one-sided, capped by ``cap``."""
    rows = [("n_genes_by_counts", *_from_log(mad_bounds(np.log1p(obs["n_genes_by_counts"].to_numpy()), nmads)))]
    if counts:
        rows.append(("total_counts", *_from_log(mad_bounds(np.log1p(obs["total_counts"].to_numpy()), nmads))))
        _, hi = mad_bounds(obs["pct_counts_mt"].to_numpy(), nmads_mt, lower=False)
        rows.append(("pct_counts_mt", -np.inf, min(hi, cap) if cap is not None else hi))
    return rows


def thresholds(
    obs: pd.DataFrame,
    *,
    mode: str,
    fixed: dict[str, Any],
    nmads: float,
    nmads_mt: float,
    counts: bool,
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """The bounds applied to each metric: a table with ``group``, ``metric``, ``lower``, ``upper``,
    ``n_outside`` (cells of the group outside them).

    MAD bounds on counts and genes are computed on the log scale (both tails); the
    mitochondrial bound is one-sided. ``fixed["max_pct_mt"]`` also caps the MAD bound.

    With ``groups`` (mad mode; one provisional cluster per cell), each group also gets its own
    MAD bounds, widened to the dataset's wherever the dataset's are wider: a cell is removed only
    when it is an outlier among all cells and among cells like it. A small population that differs
    from the rest (platelets' few genes, dendritic cells' many) keeps the bounds of its own
    kind, and a homogeneous one (naive T cells' narrow spread) is not cut tighter than the dataset.
    The ``all`` rows are the dataset's bounds, and ``n_outside`` there counts against them.
    """
    cap = fixed.get("max_pct_mt")
    if mode == "mad":
        rows = _mad_rows(obs, nmads=nmads, nmads_mt=nmads_mt, counts=counts, cap=cap)
    else:
        rows = [("n_genes_by_counts", _or(fixed.get("min_genes"), -np.inf), _or(fixed.get("max_genes"), np.inf))]
        if counts:
            rows.append(("total_counts", _or(fixed.get("min_counts"), -np.inf), _or(fixed.get("max_counts"), np.inf)))
            rows.append(("pct_counts_mt", -np.inf, _or(fixed.get("max_pct_mt"), np.inf)))
    table = [(ALL, *row, _n_outside(obs, *row)) for row in rows]
    if groups is not None and mode == "mad":
        dataset = {m: (lo, hi) for m, lo, hi in rows}
        for g in pd.unique(groups):
            part = obs[groups == g]
            for m, lo, hi in _mad_rows(part, nmads=nmads, nmads_mt=nmads_mt, counts=counts, cap=cap):
                # fmin/fmax: a cluster whose cells all lack the metric takes the dataset's bounds
                lo, hi = float(np.fmin(lo, dataset[m][0])), float(np.fmax(hi, dataset[m][1]))
                if m == "pct_counts_mt" and cap is not None:
                    hi = min(hi, cap)
                table.append((str(g), m, lo, hi, _n_outside(part, m, lo, hi)))
    return pd.DataFrame(table, columns=["group", "metric", "lower", "upper", "n_outside"])


def _outside(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Not inside [lo, hi]: a missing value is outside."""
    return ~((v >= lo) & (v <= hi))


def _n_outside(obs: pd.DataFrame, metric: str, lo: float, hi: float) -> int:
    return int(_outside(obs[metric].to_numpy(), lo, hi).sum())


def outside(obs: pd.DataFrame, table: pd.DataFrame, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Per cell and metric, whether the cell is outside the bounds that apply to it (its group's
    where ``table`` has them, else the dataset's)."""
    out = pd.DataFrame(False, index=obs.index, columns=pd.unique(table["metric"]))
    per_group = groups is not None and (table["group"] != ALL).any()
    names = np.asarray(groups).astype(str) if per_group else None
    for g, m, lo, hi in table[["group", "metric", "lower", "upper"]].itertuples(index=False):
        if (g == ALL) == per_group:
            continue
        cells = np.ones(len(obs), dtype=bool) if g == ALL else (names == g)
        column = out[m].to_numpy(copy=True)
        column[cells] = _outside(obs[m].to_numpy()[cells], lo, hi)
        out[m] = column
    return out


#: the provisional clusters QC's bounds follow: HVGs and principal axes fitted on a seeded sample
#: of cells, every cell projected onto them, then the kNN graph and Leiden (the embed and cluster
#: stages' own functions) on all cells
PROVISIONAL = {"sample": 20_000, "n_top_genes": 2_000, "n_pcs": 30, "n_neighbors": 15, "resolution": 1.0}
#: fewer cells (or varying genes) than this: no provisional clusters, the dataset's bounds apply
MIN_CELLS_CLUSTERS = 200
MIN_VARYING_GENES = 10


def _log_normalized(X, rows, totals: np.ndarray, counts: bool, genes: np.ndarray | None = None):
    """log1p(counts / total * 1e4) of ``X[rows]`` (``genes`` columns only) as float32 CSR; values
    already log-normalized are taken as they are."""
    import scipy.sparse as sp

    block = sp.csr_matrix(X[rows], dtype=np.float32)
    if genes is not None:
        block = block[:, genes]
    if counts:
        block = sp.csr_matrix(sp.diags(1e4 / np.maximum(totals[rows], 1)) @ block, dtype=np.float32)
        np.log1p(block.data, out=block.data)
    return block


def provisional_clusters(adata, *, counts: bool, seed: int = 0) -> np.ndarray | None:
    """Leiden clusters of log-normalized HVG values, for per-cluster QC bounds.

    The genes and the PCA are fitted on a seeded sample of at most ``PROVISIONAL["sample"]`` cells
    (all of them in a smaller dataset) and the cells are projected block by block: beside ``X``
    this holds one block and the cells' coordinates, whatever the size of the dataset. None when
    fewer than :data:`MIN_VARYING_GENES` genes vary: nothing to cluster on.
    """
    import anndata as ad
    import scanpy as sc

    from cellatlas.cluster import leiden
    from cellatlas.embed import neighbors, pca

    p = PROVISIONAL
    X, n = adata.X, adata.n_obs
    totals = adata.obs["total_counts"].to_numpy(dtype=np.float64)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, p["sample"]), replace=False))
    fit = ad.AnnData(_log_normalized(X, sample, totals, counts))
    varying = int((fit.X.max(axis=0) != fit.X.min(axis=0)).sum())
    if varying < MIN_VARYING_GENES:
        log.warning("QC: %d genes vary in the cells; no provisional clusters, the dataset's bounds apply", varying)
        return None
    sc.pp.highly_variable_genes(fit, n_top_genes=min(p["n_top_genes"], varying), flavor="seurat")
    hvg = fit.var["highly_variable"].to_numpy(dtype=bool)
    fit = ad.AnnData(fit.X[:, hvg], var=pd.DataFrame({"highly_variable": True}, index=adata.var_names[hvg]))
    pca(fit, n_pcs=p["n_pcs"], scale=False, seed=seed)
    axes = fit.varm["PCs"].astype(np.float64)
    offset = np.asarray(fit.X.mean(axis=0), dtype=np.float64).ravel() @ axes
    coords = np.empty((n, axes.shape[1]), dtype=np.float32)
    for r0 in range(0, n, BLOCK):
        rows = slice(r0, min(r0 + BLOCK, n))
        coords[rows] = _log_normalized(X, rows, totals, counts, hvg) @ axes - offset
    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={"X_pca": coords})
    neighbors(tmp, n_neighbors=p["n_neighbors"], seed=seed)
    leiden(tmp, resolutions=[p["resolution"]], seed=seed)
    return tmp.obs[keys.leiden_key(p["resolution"])].astype(str).to_numpy()


#: a labelled type of at least NOTE_LABEL_MIN_CELLS cells that loses more than NOTE_LABEL_LOSS
#: of them to QC is named in the run's notes
NOTE_LABEL_LOSS = 0.5
NOTE_LABEL_MIN_CELLS = 10


def labels_losing_most(removed: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`removed_by_group`'s table for labels that lost most of their cells."""
    return removed[(removed["by"] == "label") & (removed["cells_in"] >= NOTE_LABEL_MIN_CELLS)
                   & (removed["removed_share"] > NOTE_LABEL_LOSS)]


def removed_by_group(cells: pd.DataFrame, why: pd.DataFrame, groups: dict[str, pd.Series]) -> pd.DataFrame:
    """Per label and per provisional cluster: cells in, cells removed, the share, and how many
    each metric's bounds removed (a cell can fall outside several). Cells without a value (no
    label) are left out of that grouping; with no groups the table has its columns and no rows."""
    outside_cols = [f"outside_{m}" for m in why.columns]
    columns = ["by", "group", "cells_in", "removed", "removed_share", *outside_cols]
    frames = []
    for by, values in groups.items():
        frame = pd.DataFrame({"group": values.to_numpy(), "removed": ~cells["passed_qc"].to_numpy()})
        frame[outside_cols] = why.to_numpy()
        frame = frame[frame["group"].notna()]
        frame["group"] = frame["group"].astype(str)
        table = frame.groupby("group", sort=True).agg(
            cells_in=("removed", "size"), removed=("removed", "sum"), **{c: (c, "sum") for c in outside_cols})
        table["removed_share"] = table["removed"] / table["cells_in"]
        frames.append(table.reset_index().assign(by=by)[columns])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _or(value, default):
    return default if value is None else value


#: Scrublet needs enough cells for its PCA and kNN; smaller groups are left unscored
MIN_CELLS_DOUBLETS = 100


def score_doublets(adata, *, group: str | None, seed: int = 0) -> int:
    """Scrublet per group; adds ``obs["doublet_score"]`` (NaN where unscored) and ``predicted_doublet``.

    Returns the number of cells left unscored because their group had fewer than
    :data:`MIN_CELLS_DOUBLETS` cells.
    """
    import scanpy as sc

    scores = np.full(adata.n_obs, np.nan)
    predicted = np.zeros(adata.n_obs, dtype=bool)
    codes = adata.obs[group].astype(str).to_numpy() if group else np.zeros(adata.n_obs, dtype=int)
    skipped = 0
    for value in pd.unique(codes):
        idx = np.flatnonzero(codes == value)
        if len(idx) < MIN_CELLS_DOUBLETS:
            skipped += len(idx)
            log.warning("doublets: group %s=%s has %d cells, left unscored", group, value, len(idx))
            continue
        sub = adata[idx].copy()
        # exact kNN: deterministic, and 4x faster than pynndescent at these sizes (6,250 cells: 13 s vs 55 s)
        sc.pp.scrublet(sub, random_state=seed, verbose=False, use_approx_neighbors=False)
        scores[idx] = sub.obs["doublet_score"].to_numpy()
        predicted[idx] = sub.obs["predicted_doublet"].to_numpy(dtype=bool)
        del sub
        gc.collect()  # the group's copy and Scrublet's simulated doublets, before the next group's
    adata.obs["doublet_score"] = scores
    adata.obs["predicted_doublet"] = predicted
    return skipped


#: cells per block of the in-place subset (its temporaries are one block's nonzeros)
BLOCK = 10_000


def detected_in(X, cells: np.ndarray) -> np.ndarray:
    """Per gene, the number of ``cells`` (a boolean mask) with a nonzero value."""
    import scipy.sparse as sp

    if not (sp.issparse(X) and X.format == "csr"):
        return np.asarray((X[cells] > 0).sum(axis=0)).ravel()
    n = np.zeros(X.shape[1], dtype=np.int64)
    for r0 in range(0, X.shape[0], BLOCK):
        lo, hi = X.indptr[r0], X.indptr[min(r0 + BLOCK, X.shape[0])]
        rows = np.repeat(cells[r0:r0 + BLOCK], np.diff(X.indptr[r0:r0 + BLOCK + 1]))
        n += np.bincount(X.indices[lo:hi][rows & (X.data[lo:hi] > 0)], minlength=X.shape[1])
    return n


def subset(adata, cells: np.ndarray, genes: np.ndarray, *, consume: bool = False):
    """``adata[cells, genes]`` (boolean masks) as a new AnnData.

    With ``consume``, a CSR ``X`` (with nothing cell- or gene-wise beside obs and var, as ingest
    hands it) is compacted in its own arrays, block by block, instead of copied, and ``adata``
    loses its ``X``: anndata's subset holds the old and the new matrix at once, two copies of the
    largest thing QC holds. Otherwise anndata subsets a copy.
    """
    import anndata as ad
    import scipy.sparse as sp

    X = adata.X
    # colours in uns follow categories, which anndata's subset trims: such data take anndata's path
    plain = not (adata.layers or adata.obsm or adata.obsp or adata.varm or adata.varp or adata.raw is not None
                 or any(key.endswith("_colors") for key in adata.uns))
    if not (consume and plain and sp.issparse(X) and X.format == "csr"):
        out = adata[cells][:, genes].copy()
        # an AnnData sits in reference cycles: the superseded matrix is freed now, not when the
        # collector next runs (measured at 100,000 cells: three copies held after two subsets)
        gc.collect()
        return out
    column = (np.cumsum(genes) - 1).astype(X.indices.dtype)
    kept_per_row = np.zeros(X.shape[0], dtype=np.int64)
    w = 0
    for r0 in range(0, X.shape[0], BLOCK):
        r1 = min(r0 + BLOCK, X.shape[0])
        lo, hi = X.indptr[r0], X.indptr[r1]
        counts = np.diff(X.indptr[r0:r1 + 1])
        idx = X.indices[lo:hi]
        keep = np.repeat(cells[r0:r1], counts) & genes[idx]
        n = int(keep.sum())
        # the kept values only move left (w <= lo), so a block never overwrites what is still to be read
        X.data[w:w + n] = X.data[lo:hi][keep]
        X.indices[w:w + n] = column[idx[keep]]
        kept_per_row[r0:r1] = np.bincount(np.repeat(np.arange(r1 - r0), counts)[keep], minlength=r1 - r0)
        w += n
    indptr = np.concatenate([[0], np.cumsum(kept_per_row[cells])]).astype(X.indptr.dtype)
    data, indices = X.data, X.indices
    try:  # in place: the tail goes back to the allocator
        data.resize(w, refcheck=False)
        indices.resize(w, refcheck=False)
    except ValueError:  # arrays that do not own their memory: views, the tail stays until X is freed
        data, indices = data[:w], indices[:w]
    matrix = sp.csr_matrix((data, indices, indptr), shape=(int(cells.sum()), int(genes.sum())))
    out = ad.AnnData(X=matrix, obs=_used_categories(adata.obs[cells]), var=_used_categories(adata.var[genes]),
                     uns=adata.uns)
    adata.X = None
    return out


def _used_categories(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each categorical column's unused categories dropped, as anndata's subset does
    (a batch QC emptied is no batch to normalize or integrate)."""
    frame = frame.copy()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].cat.remove_unused_categories()
    return frame


@dataclass
class QCResult:
    adata: Any  #: the filtered AnnData
    thresholds: pd.DataFrame  #: group, metric, lower, upper, n_outside
    cells: pd.DataFrame  #: every input cell's metrics, provisional cluster and whether it passed
    summary: dict[str, Any]
    removed: pd.DataFrame  #: per label and provisional cluster, cells in and removed (:func:`removed_by_group`)


def run_qc(
    adata,
    dataset: str,
    *,
    mode: str = "mad",
    fixed: dict[str, Any] | None = None,
    nmads: float = 5.0,
    nmads_mt: float = 3.0,
    per_cluster: bool = True,
    min_cells: int = 3,
    doublets: bool = True,
    remove_doublets: bool = False,
    seed: int = 0,
    consume: bool = False,
):
    """Compute QC metrics, filter cells and genes, score doublets.

    In mad mode with ``per_cluster``, the bounds follow provisional clusters (:func:`thresholds`)
    on datasets of at least :data:`MIN_CELLS_CLUSTERS` cells.

    Returns
    -------
    :class:`QCResult`. The filtered AnnData gains obs
    ``total_counts``, ``n_genes_by_counts``, ``pct_counts_mt``, ``pct_counts_ribo`` and, with
    counts, ``doublet_score``/``predicted_doublet``; ``uns["cellatlas"]["qc"]`` records params and summary.
    With ``consume``, ``adata``'s matrix becomes the result's and ``adata`` loses its ``X``
    (:func:`subset`): what the stage does with the AnnData it read, one copy of the matrix less.
    """

    fixed = fixed or {}
    counts = adata.uns[keys.UNS_KEY]["ingest"]["values"] == keys.VALUES_COUNTS
    compute_metrics(adata)
    clusters = None
    if mode == "mad" and per_cluster and adata.n_obs >= MIN_CELLS_CLUSTERS:
        clusters = provisional_clusters(adata, counts=counts, seed=seed)
    table = thresholds(adata.obs, mode=mode, fixed=fixed, nmads=nmads, nmads_mt=nmads_mt, counts=counts,
                       groups=clusters)
    why = outside(adata.obs, table, clusters)
    keep = ~why.any(axis=1).to_numpy()  # a cell without a metric's value (no counts) is outside
    n_in, g_in = adata.n_obs, adata.n_vars
    metric_cols = ["n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo"]
    cells = adata.obs[metric_cols].copy()
    cells["passed_qc"] = keep
    groups = {"label": adata.obs[keys.LABEL]} if keys.LABEL in adata.obs else {}
    if clusters is not None:
        cells["qc_cluster"] = clusters
        groups["qc_cluster"] = cells["qc_cluster"]
    removed = removed_by_group(cells, why, groups)
    if not keep.any():
        dataset_rows = table[table["group"] == ALL]
        bounds = "; ".join(f"{m} in [{lo:.4g}, {hi:.4g}]"
                           for m, lo, hi in dataset_rows[["metric", "lower", "upper"]].itertuples(index=False))
        where = ", or a provisional cluster's wider bounds" if clusters is not None else ""
        raise InputDataError(dataset, f"no cells left after QC ({n_in} cells in; {bounds}{where})")
    genes = detected_in(adata.X, keep) >= min_cells
    if not genes.any():
        raise InputDataError(dataset, f"no genes detected in at least {min_cells} cells after QC")
    adata = subset(adata, keep, genes, consume=consume)

    summary: dict[str, Any] = {
        "cells_in": n_in,
        "cells_kept": int(adata.n_obs),
        "genes_in": g_in,
        "genes_kept": int(adata.n_vars),
        "count_based_qc": counts,
        "qc_clusters": 0 if clusters is None else len(pd.unique(clusters)),
    }
    if groups.get("label") is not None:
        summary["labels_losing_most"] = len(labels_losing_most(removed))
    if not counts:
        summary["skipped"] = "input is log-normalized: total-count, mitochondrial and doublet QC need counts"
    if doublets and counts:
        # Doublets form inside one capture, so score each sample (donor, else batch) on its own:
        # also what keeps Scrublet tractable (measured: 50,000 cells in one group took 437 s, 10 GiB).
        group = next((k for k in (keys.DONOR, keys.BATCH) if k in adata.obs and adata.obs[k].nunique() > 1), None)
        skipped = score_doublets(adata, group=group, seed=seed)
        summary["doublet_groups"] = group or ""
        summary["doublet_cells_unscored"] = skipped
        predicted = adata.obs["predicted_doublet"].to_numpy(dtype=bool)
        summary["doublets_predicted"] = int(predicted.sum())
        summary["doublet_rate"] = float(predicted.mean())
        if remove_doublets:
            adata = subset(adata, ~predicted, np.ones(adata.n_vars, dtype=bool), consume=True)
            summary["cells_kept"] = int(adata.n_obs)
            if adata.n_obs == 0:
                raise InputDataError(dataset, "no cells left after removing predicted doublets")
    adata.uns.setdefault(keys.UNS_KEY, {})["qc"] = {
        "params": {"mode": mode, "nmads": nmads, "nmads_mt": nmads_mt, "per_cluster": per_cluster, "min_cells": min_cells,
                   **{k: v for k, v in fixed.items() if v is not None}},
        "summary": summary,
    }
    if doublets and counts:
        cells["doublet_score"] = adata.obs["doublet_score"].reindex(cells.index)
    return QCResult(adata=adata, thresholds=table, cells=cells, summary=summary, removed=removed)
