"""Preprocessing as scikit-learn transformers, so every fitted step lives inside the fold.

Input is the log-normalized matrix over *all* genes (sparse). The genes a model sees are chosen
by :class:`GeneSelector` on the training rows of each fold: the dataset-wide HVGs of the
normalize stage were chosen on every cell, test cells included, and would leak.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

GENE_METHODS = ("hvg", "anova", "all")
INPUTS = ("genes", "pca")


#: nonzeros transformed per block when summing over a sparse matrix (bounds the temporaries)
CHUNK = 1 << 22


def _expm1_mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance of ``expm1(X)``, without copying the matrix.

    On CSR input the nonzeros are summed per column in blocks (``np.bincount`` on the column
    indices); a copy of a 100,000-cell matrix and its square would otherwise triple the memory.
    """
    n, g = X.shape
    if sp.issparse(X):
        X = X.tocsr()
        s1, s2 = np.zeros(g), np.zeros(g)
        for start in range(0, X.nnz, CHUNK):
            v = np.expm1(X.data[start : start + CHUNK].astype(np.float64))
            idx = X.indices[start : start + CHUNK]
            s1 += np.bincount(idx, weights=v, minlength=g)
            s2 += np.bincount(idx, weights=v * v, minlength=g)
    else:
        v = np.expm1(np.asarray(X, dtype=np.float64))
        s1, s2 = v.sum(axis=0), (v * v).sum(axis=0)
    mean = s1 / n
    # the sample variance, as scanpy's seurat flavour uses
    var = np.maximum(s2 / n - mean * mean, 0.0) * (n / max(n - 1, 1))
    return mean, var


def hvg_scores(X, n_bins: int = 20) -> np.ndarray:
    """Seurat-style normalized dispersion of log-normalized expression (higher: more variable).

    Dispersion (variance / mean, on expm1 values as in scanpy's ``seurat`` flavour) is
    log-transformed and z-scored within bins of mean expression; genes never detected score -inf.
    """
    mean, var = _expm1_mean_var(X)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
        log_mean = np.log1p(mean)
    score = np.full(X.shape[1], -np.inf)
    ok = (mean > 0) & np.isfinite(disp)
    if not ok.any():
        return score
    edges = np.linspace(log_mean[ok].min(), log_mean[ok].max() + 1e-12, n_bins + 1)
    bins = np.clip(np.digitize(log_mean, edges) - 1, 0, n_bins - 1)
    for b in np.unique(bins[ok]):
        idx = ok & (bins == b)
        d = disp[idx]
        sd = d.std(ddof=1) if idx.sum() > 1 else 0.0
        # a bin with one gene (or no spread) ranks its genes as average, as scanpy does
        score[idx] = (d - d.mean()) / sd if sd > 0 else 0.0
    return score


class GeneSelector(TransformerMixin, BaseEstimator):
    """Keep ``n_genes`` genes chosen on the rows it is fitted on.

    Parameters
    ----------
    method
        ``hvg``: highest normalized dispersion (unsupervised); ``anova``: highest F statistic
        against the target (``f_classif`` / ``f_regression``); ``all``: every gene.
    n_genes
        Genes to keep (all when the data have fewer).
    task
        ``classification`` or ``regression`` (for ``anova``).

    Attributes
    ----------
    support_ : indices of the kept genes, in input order.
    scores_ : the per-gene ranking score (NaN for ``all``).
    n_rows_fitted_ : rows the selection was computed on.
    """

    def __init__(self, method: str = "hvg", n_genes: int = 2000, task: str = "classification"):
        self.method = method
        self.n_genes = n_genes
        self.task = task

    def fit(self, X, y=None):
        n = X.shape[1]
        if self.method == "all" or self.n_genes >= n:
            scores = np.full(n, np.nan)
            support = np.arange(n)
        else:
            if self.method == "hvg":
                scores = hvg_scores(X)
            elif self.method == "anova":
                from sklearn.feature_selection import f_classif, f_regression

                f = f_classif if self.task == "classification" else f_regression
                with np.errstate(divide="ignore", invalid="ignore"):
                    scores = np.nan_to_num(f(X, y)[0], nan=-np.inf)
            else:
                raise ValueError(f"unknown gene selection method {self.method!r} (one of {GENE_METHODS})")
            # stable sort on the negated score: ties keep gene order, so selection is deterministic
            support = np.sort(np.argsort(-scores, kind="stable")[: self.n_genes])
        self.support_ = support
        self.scores_ = scores
        self.n_features_in_ = n
        self.n_rows_fitted_ = X.shape[0]
        return self

    def transform(self, X):
        check_is_fitted(self, "support_")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} genes, got {X.shape[1]}")
        return X[:, self.support_]


class ToDense(TransformerMixin, BaseEstimator):
    """Densify (float32) for estimators without sparse support; only ever after gene selection."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def build_pipeline(
    estimator,
    *,
    task: str,
    input: str = "genes",
    genes: str = "hvg",
    n_genes: int = 2000,
    scale: bool = True,
    n_pcs: int = 50,
    dense: bool = False,
    seed: int = 0,
) -> Pipeline:
    """``select -> [scale] -> [pca] -> [dense] -> estimator``, fitted as one unit per fold.

    ``input="pca"`` projects the (scaled) selected genes on ``n_pcs`` principal components,
    centred implicitly so the sparse matrix is never densified. Scaling keeps sparsity
    (``with_mean=False``): each gene is divided by its standard deviation on the training rows.
    """
    from sklearn.decomposition import PCA

    if input not in INPUTS:
        raise ValueError(f"unknown input {input!r} (one of {INPUTS})")
    steps = [("select", GeneSelector(method=genes, n_genes=n_genes, task=task))]
    if scale:
        steps.append(("scale", StandardScaler(with_mean=False)))
    if input == "pca":
        # arpack keeps the matrix sparse (implicit centring); covariance_eigh was 5x slower here,
        # its sparse X^T X costing more than the Lanczos iterations
        steps.append(("pca", PCA(n_components=n_pcs, svd_solver="arpack", random_state=seed)))
    elif dense:
        steps.append(("dense", ToDense()))
    steps.append(("model", estimator))
    return Pipeline(steps)


def gene_weights(pipeline: Pipeline, weights: np.ndarray, n_genes: int) -> np.ndarray:
    """Map weights on the model's input features (``k x features``) back to all input genes.

    Through PCA, a weight on components becomes ``weights @ components_``; through scaling, a
    weight per standardized gene stays as it is (effect of one standard deviation); genes the
    selector dropped get 0.
    """
    w = np.atleast_2d(weights)
    if "pca" in pipeline.named_steps:
        w = w @ pipeline.named_steps["pca"].components_
    out = np.zeros((w.shape[0], n_genes))
    out[:, pipeline.named_steps["select"].support_] = w
    return out
