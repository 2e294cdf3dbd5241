"""Genes of a query matched to the reference's (by id, else by symbol)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas.errors import AtlasError

from cellatlas.atlas import ID_COLUMNS

log = logging.getLogger(__name__)


def id_column(var: pd.DataFrame) -> str | None:
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
    rid, qid = id_column(reference_var), id_column(query_var)
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
