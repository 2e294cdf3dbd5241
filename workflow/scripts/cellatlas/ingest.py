"""Read a dataset from any supported source into one canonical AnnData, and validate it.

Canonical means: the chosen matrix in ``X`` as CSR float32, unique cell and gene names,
the dataset's label/batch/donor columns copied to ``obs["label"|"batch"|"donor"]``, and no
precomputed embeddings or graphs carried over from the source (a later stage must never
silently reuse somebody else's PCA). scanpy only warns on bad input; here it is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.errors import InputDataError

log = logging.getLogger(__name__)

#: datasets that ship inside scanpy's wheel (no download)
BUNDLED = ("pbmc68k_reduced", "krumsiek11")


def _reason(error: Exception, path: str | Path) -> str:
    """A reader's message without the path the error line names already (readers repeat it)."""
    return str(error).replace(str(path), Path(path).name)


def read_source(dataset: str, source: dict[str, Any], path: str | None = None):
    """Read the raw AnnData of ``dataset`` as its ``source`` describes.

    ``path`` is the local file to read (for ``url`` sources the verified download).
    """
    import anndata as ad

    kind = source["kind"]
    fmt = source.get("format", kind) if kind == "url" else kind
    if kind == "simulate":
        from cellatlas.resources import check_memory
        from cellatlas.simulate import SimulationParams, estimate_bytes, simulate_counts

        fields = SimulationParams.__dataclass_fields__
        params = SimulationParams(**{k: v for k, v in source.items() if k in fields})
        if params.n_cells > 20_000:  # small sets always fit; the pilot would cost more than it saves
            check_memory(estimate_bytes(params), dataset=dataset, what=f"simulating {params.n_cells:,} cells x "
                         f"{params.n_genes:,} genes", hint="lower source.n_cells or source.n_genes")
        return simulate_counts(params)
    if kind == "scanpy":
        import scanpy as sc

        return getattr(sc.datasets, source["name"])()

    if path is None or not os.path.exists(path):
        raise InputDataError(dataset, "file does not exist", path=path)
    if os.path.isdir(path) and fmt != "10x_mtx":
        raise InputDataError(dataset, f"is a folder, not a {fmt} file (a Cell Ranger matrix folder is kind: 10x_mtx)",
                             path=path)
    try:
        if fmt == "10x_mtx":
            import scanpy as sc

            adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=True)
        elif fmt == "10x_h5":
            import scanpy as sc

            adata = sc.read_10x_h5(path)
            adata.var_names_make_unique()
        elif fmt == "h5ad":
            adata = ad.read_h5ad(path)
        elif fmt == "csv":
            sep = "\t" if ".tsv" in Path(path).name else ","
            _check_header(path, sep, dataset)
            frame = pd.read_csv(path, sep=sep, index_col=0)
            if source.get("genes_as_rows", False):
                frame = frame.T
            _check_orientation(frame.index, frame.columns, dataset, path, source.get("genes_as_rows", False))
            adata = ad.AnnData(
                X=sp.csr_matrix(frame.to_numpy(dtype=np.float64, na_value=np.nan)),
                obs=pd.DataFrame(index=frame.index.astype(str)),
                var=pd.DataFrame(index=frame.columns.astype(str)),
            )
        else:  # the schema's enum makes this unreachable from a validated config
            raise InputDataError(dataset, f"unknown format '{fmt}'", path=path)
    except InputDataError:
        raise
    except ValueError as e:
        if "could not convert" in str(e) or "convert string" in str(e):
            raise InputDataError(dataset, f"not a numeric {fmt} matrix ({_reason(e, path)})", path=path) from e
        raise InputDataError(dataset, f"cannot read as {fmt}: {_reason(e, path)}", path=path) from e
    except Exception as e:  # corrupt or truncated files raise anything from OSError to KeyError
        raise InputDataError(dataset, f"cannot read as {fmt}: {type(e).__name__}: {_reason(e, path)}",
                             path=path) from e
    return adata


def _check_header(path: str, sep: str, dataset: str) -> None:
    """pandas renames a repeated column (``g1.1``) and names an empty one (``Unnamed: 2``): refuse both."""
    import csv
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])[1:]
    blank = [column for column, name in enumerate(header, start=2) if not name.strip()]  # column 1: cell names
    if blank:
        raise InputDataError(dataset, f"column {blank[0]} of the header has no name", path=path)
    seen = pd.Index(header)
    if seen.has_duplicates:
        dup = seen[seen.duplicated()].unique()
        raise InputDataError(dataset, f"{len(dup)} names repeated in the header (e.g. {', '.join(map(str, dup[:3]))})",
                             path=path)


#: names that only a cell has (a 10x barcode: 14 or 16 bases) or only a gene has (an Ensembl id, a
#: mitochondrial gene): what tells a table's orientation, since both sides are just strings
_BARCODE = re.compile(r"[ACGTN]{12,}")
_GENE = re.compile(r"^(ENS[A-Z]*G\d{6,}(\.\d+)?|MT-[A-Za-z0-9]+|mt-[A-Za-z0-9]+)$")


def _share(names, pattern: re.Pattern) -> float:
    names = [str(n) for n in names[:2000]]
    return sum(bool(pattern.search(n)) for n in names) / max(len(names), 1)


def _check_orientation(cells, genes, dataset: str, path: str | None, genes_as_rows: bool) -> None:
    """Refuse a table read the wrong way round: the cell side named like genes (an Ensembl id or an
    MT- gene among them) or the gene side like barcodes, while the other side is not."""
    as_cells = _share(cells, _BARCODE) > 0.5 or (_share(genes, _GENE) > 0 and _share(cells, _GENE) == 0)
    as_genes = _share(genes, _BARCODE) > 0.5 or (_share(cells, _GENE) > 0 and _share(genes, _GENE) == 0)
    if as_genes and not as_cells:
        side = "rows" if genes_as_rows else "columns"
        example = next((str(n) for n in cells if _GENE.search(str(n))), str(cells[0]))
        raise InputDataError(dataset, f"genes_as_rows: {str(genes_as_rows).lower()} reads the {side} as genes, but "
                             f"the cells are named like genes (e.g. '{example}') and the genes like cells; set "
                             f"genes_as_rows: {str(not genes_as_rows).lower()}", path=path)


def canonicalize(
    adata,
    dataset: str,
    *,
    matrix: str = "X",
    values: str = keys.VALUES_COUNTS,
    label_key: str | None = None,
    batch_key: str | None = None,
    donor_key: str | None = None,
    path: str | None = None,
):
    """Validate ``adata`` and return the canonical AnnData for the pipeline.

    Parameters
    ----------
    matrix
        ``"X"``, ``"raw"`` (``adata.raw.X``, for files whose X is already scaled) or a layer name.
    values
        ``"counts"``: non-negative integers required. ``"lognorm"``: already log-normalized
        values; count-based QC and normalization are then skipped, and the record says so.

    Returns
    -------
    A new AnnData. ``obs`` gains ``label``/``batch``/``donor`` where the keys are given;
    ``uns["cellatlas"]["ingest"]`` records the dataset, values, keys and the input's shape.
    """
    import anndata as ad

    X, var = _select_matrix(adata, dataset, matrix, path)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputDataError(dataset, f"the matrix is empty ({X.shape[0]} cells x {X.shape[1]} genes)", path=path)
    # a float32 CSR matrix is taken as it is: a copy here was a second matrix held through ingest
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr().astype(np.float32, copy=False)
    X.sum_duplicates()
    X.eliminate_zeros()
    _check_values(X, dataset, values, path)
    _check_unique(adata.obs_names, "cell", dataset, path)
    _check_unique(var.index, "gene", dataset, path)

    obs = adata.obs.copy()
    for std, key in ((keys.LABEL, label_key), (keys.BATCH, batch_key), (keys.DONOR, donor_key)):
        if key is None:
            continue
        if key not in obs.columns:
            avail = ", ".join(map(str, list(obs.columns)[:12])) or "none"
            raise InputDataError(dataset, f"{std}_key '{key}' is not an obs column (columns: {avail})", path=path)
        col = obs[key]
        if std != keys.LABEL and col.isna().any():
            raise InputDataError(dataset, f"{std}_key '{key}' has {int(col.isna().sum())} missing values", path=path)
        obs[std] = pd.Categorical(col.astype("string").astype(object).where(col.notna(), None))
    out = ad.AnnData(X=X, obs=obs, var=var.copy())
    out.uns[keys.UNS_KEY] = {
        "ingest": {
            "dataset": dataset,
            "values": values,
            "matrix": matrix,
            "label_key": label_key or "",
            "batch_key": batch_key or "",
            "donor_key": donor_key or "",
            "n_cells": int(X.shape[0]),
            "n_genes": int(X.shape[1]),
        }
    }
    return out


def subset(adata, dataset: str, *, keep: dict[str, list] | None = None, drop: dict[str, list] | None = None):
    """The cells whose obs values pass ``keep`` (one of the listed values in every named column)
    and not ``drop`` (none of them); the record gains the rule and the number of cells left.

    Raises
    ------
    InputDataError
        A column the data lacks, or no cell left.
    """
    if not keep and not drop:
        return adata
    mask = np.ones(adata.n_obs, dtype=bool)
    for rule, wanted in (("keep", keep or {}), ("drop", drop or {})):
        for column, values in wanted.items():
            if column not in adata.obs:
                avail = ", ".join(map(str, list(adata.obs.columns)[:12]))
                raise InputDataError(dataset, f"subset.{rule}: '{column}' is not an obs column (columns: {avail})")
            col = adata.obs[column]
            if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
                hit = col.isin([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)])
            else:  # categories, strings, booleans: as the config spells them
                hit = col.astype(str).isin([str(v) for v in values])
            hit = hit.to_numpy()
            mask &= hit if rule == "keep" else ~hit
    if not mask.any():
        raise InputDataError(dataset, f"subset keep={keep or {}} drop={drop or {}} leaves no cells")
    out = adata[mask].copy()
    for column in out.obs.select_dtypes("category"):
        out.obs[column] = out.obs[column].cat.remove_unused_categories()
    record = out.uns[keys.UNS_KEY]["ingest"]
    record.update({"subset": {"keep": keep or {}, "drop": drop or {}}, "n_cells_source": record["n_cells"],
                   "n_cells": int(out.n_obs)})
    return out


def _select_matrix(adata, dataset: str, matrix: str, path: str | None):
    if matrix == "X":
        return adata.X, adata.var
    if matrix == "raw":
        if adata.raw is None:
            raise InputDataError(dataset, "matrix 'raw' requested but the file has no .raw", path=path)
        return adata.raw.X, adata.raw.var
    if matrix not in adata.layers:
        avail = ", ".join(adata.layers.keys()) or "none"
        raise InputDataError(dataset, f"layer '{matrix}' not found (layers: {avail})", path=path)
    return adata.layers[matrix], adata.var


def _check_values(X: sp.csr_matrix, dataset: str, values: str, path: str | None) -> None:
    data = X.data
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputDataError(dataset, f"{n} non-finite values (NaN or infinite) in the matrix", path=path)
    if data.size and data.min() < 0:
        raise InputDataError(
            dataset, f"{int((data < 0).sum())} negative values; expected counts or log-normalized values", path=path
        )
    # in blocks: np.round of the whole data array would be half a copy of the matrix more
    block = 1 << 24
    integral = all(np.array_equal(part, np.round(part)) for part in (data[i:i + block] for i in range(0, data.size, block)))
    if values == keys.VALUES_COUNTS and not integral:
        raise InputDataError(
            dataset,
            "non-integer values where counts are required (set values: lognorm if the data are already normalized)",
            path=path,
        )
    if values == keys.VALUES_LOGNORM and integral and data.size:
        raise InputDataError(
            dataset, "values: lognorm was set, but the matrix holds integer counts (set values: counts)", path=path
        )


def _check_unique(names: pd.Index, what: str, dataset: str, path: str | None) -> None:
    dup = names[names.duplicated()]
    if len(dup):
        shown = ", ".join(map(str, dup[:3].tolist()))
        raise InputDataError(dataset, f"{len(dup)} duplicate {what} names (e.g. {shown})", path=path)


def download(url: str, sha256: str, dest: str, *, dataset: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` and verify its SHA-256; nothing is left at ``dest`` on failure."""
    dest_path = Path(dest)
    if dest_path.name in ("", ".", "..") or dest_path.name != os.path.basename(dest):
        raise InputDataError(dataset, f"download file name '{dest_path.name}' is not one plain file name (source.filename)")
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_path.parent, prefix=".download-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while block := resp.read(1 << 20):
                        h.update(block)
                        out.write(block)
            except OSError as e:
                raise InputDataError(dataset, f"download of {url} failed: {e}") from e
        if h.hexdigest() != sha256.lower():
            raise InputDataError(dataset, f"checksum mismatch for {url}: expected sha256 {sha256}, got {h.hexdigest()}")
        shutil.move(tmp, dest_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
