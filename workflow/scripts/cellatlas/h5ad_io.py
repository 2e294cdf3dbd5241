"""Reading a stage's input without its large elements, and writing its output around them.

A stage that only adds to a dataset (embed adds maps, cluster adds clusters) need not hold the
matrices it does not change. :func:`read` leaves named elements (``layers``, even ``X``) on disk;
the stage returns a :class:`Carried` AnnData, and :func:`write` writes what the stage holds and
copies the elements it left out from the input file with HDF5's object copy, block by block,
never through memory. The output is an ordinary, complete h5ad file: the stage contract
(each stage hands ``results/{dataset}/<stage>.h5ad`` to the next) is unchanged.

Measured at 100,000 cells (20,000 genes, 131 M nonzeros): the counts layer beside ``X`` is a
second copy of the matrix in every stage after normalize; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: the AnnData elements a stage may leave on disk
CARRIABLE = ("X", "layers", "raw")


@dataclass
class Carried:
    """An AnnData read by :func:`read` without ``carried``, to be written as ``base`` with the
    elements the stage holds replaced and ``carried`` copied unchanged from ``base``."""

    adata: Any
    base: str
    carried: tuple[str, ...]
    #: layers of the output copied from elements of ``base`` (normalize: ``{"counts": "X"}``, the
    #: counts kept on disk while ``X`` becomes log-normalized in memory)
    layers_from: dict[str, str] = field(default_factory=dict)


def read(path: str, *, without: Sequence[str] = ("layers",), unchanged: Sequence[str] = (),
         layers_from: Mapping[str, str] | None = None) -> Carried:
    """The h5ad at ``path`` without the elements ``without``, to be written back by :func:`write`
    with them and the elements ``unchanged`` (read, but the stage promises not to change them: a
    matrix read for a computation need not be written again) copied from ``path``, and the output
    layers ``layers_from`` (layer name -> element of ``path``) copied from ``path`` too."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    unknown = (set(without) | set(unchanged) | set((layers_from or {}).values())) - set(CARRIABLE)
    if unknown:
        raise ValueError(f"only {CARRIABLE} can be left on disk, not {sorted(unknown)}")
    with h5py.File(path, "r") as f:
        elems = {key: read_elem(f[key]) for key in f if key not in without}
    raw = elems.pop("raw", None)
    adata = ad.AnnData(**elems)
    if raw is not None:
        adata.raw = ad.AnnData(**raw) if isinstance(raw, dict) else raw
    return Carried(adata, path, (*without, *unchanged), dict(layers_from or {}))


def read_columns(path: str, key: str, columns, *, block: int = 10_000):
    """The matrix ``key`` of the h5ad at ``path`` restricted to ``columns`` (a boolean mask), as
    CSR: a CSR matrix is read ``block`` rows at a time, so its other columns are never in memory
    (embed reads the HVG columns of X: at a million cells, 9 GiB of X not held)."""
    import h5py
    import numpy as np
    import scipy.sparse as sp
    from anndata.io import read_elem, sparse_dataset

    columns = np.asarray(columns, dtype=bool)
    with h5py.File(path, "r") as f:
        elem = f[key]
        if not (isinstance(elem, h5py.Group) and elem.attrs.get("encoding-type") == "csr_matrix"):
            return sp.csr_matrix(read_elem(elem))[:, columns]
        X = sparse_dataset(elem)
        parts = [X[r0:r0 + block][:, columns] for r0 in range(0, X.shape[0], block)]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, int(columns.sum())), dtype=X.dtype)


def write(item: Carried, path: str) -> None:
    """Write ``item.adata`` to ``path`` with the carried elements copied from ``item.base``."""
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    adata = item.adata
    # an AnnData of what the stage holds: no X or layers it was not given (anndata writes no X
    # when X is None, and an empty layers group)
    shell = ad.AnnData(
        X=None if "X" in item.carried else adata.X,
        obs=adata.obs, var=adata.var, uns=adata.uns, obsm=adata.obsm, varm=adata.varm,
        obsp=adata.obsp, varp=adata.varp, layers=None if "layers" in item.carried else adata.layers,
    )
    if "raw" not in item.carried and adata.raw is not None:
        shell.raw = adata.raw.to_adata()
    shell.write_h5ad(path)
    with h5py.File(item.base, "r") as src, h5py.File(path, "r+") as dst:
        for key in item.carried:
            if key in dst:
                del dst[key]
            if key in src:
                src.copy(src[key], dst, name=key)
        if item.layers_from and "layers" not in dst:
            write_elem(dst, "layers", {})
        for layer, key in item.layers_from.items():
            if layer in dst["layers"]:
                del dst["layers"][layer]
            src.copy(src[key], dst["layers"], name=layer)
