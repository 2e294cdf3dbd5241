"""Image datasets read into the pipeline's container (see :mod:`cellatlas.images`), checked first.

Three sources:

* ``folder``: one sub-folder per class, images inside (torchvision's ``ImageFolder`` layout);
* ``table``: a CSV or TSV with a column of image paths (relative to the table), a label column
  and optional group columns (image, well, plate, donor);
* ``npz``: a NumPy archive with an ``images`` array (cells x height x width [x channels], or
  cells x channels x height x width), ``labels``, and optional arrays named like group columns.

PNG, JPEG and TIFF, 8 or 16 bit (scaled by their bit depth to [0, 1]; floats kept as they are;
Pillow reads 16-bit PNGs as 16 bit only when grey: keep 16-bit colour in TIFF). Channels: a grey
image is one channel; RGB keeps three, RGBA drops its alpha, a palette image is RGB; a TIFF or an
npz stack keeps all its channels (last when that axis is strictly the shortest, else first).
Every image of a dataset must have the same size and channels: cropping or resizing is a
decision about the biology and stays with the user. Every problem is a one-line error naming
the dataset and the file, raised before anything is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellatlas import keys
from cellatlas.errors import InputDataError

from cellatlas.images import CHANNELS_KEY, IMAGE_KEY, SHAPE_KEY

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _scaled(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "u" and a.dtype.itemsize in (1, 2):  # either byte order
        return a.astype(np.float32) / (255.0 if a.dtype.itemsize == 1 else 65535.0)
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{a.dtype} pixels (8 or 16 bit, or floats)")
    return a.astype(np.float32)


def _channels_last(shape) -> bool:
    """A stack's channels are its last axis when that is strictly its shortest, else its first."""
    return shape[-1] < min(shape[:-1])


def load_image(path: str | Path) -> np.ndarray:
    """One image as float32 channels x height x width (see the module's docstring)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        a = tifffile.imread(path)
        if a.ndim == 3 and _channels_last(a.shape):
            a = np.moveaxis(a, -1, 0)
    else:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr"):
                im = im.convert("RGB" if im.mode != "LA" else "L")
            a = np.asarray(im)
        if a.ndim == 3:
            a = np.moveaxis(a, -1, 0)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{a.ndim} dimensions (an image has 2, or 3 with channels)")
    if a.size == 0:
        raise ValueError("no pixels")
    return _scaled(a)


def _stack(dataset: str, paths: Sequence[Path]) -> np.ndarray:
    images, first = [], None
    for path in paths:
        try:
            img = load_image(path)
        except Exception as e:  # any decoder's failure: the user needs the file, not the traceback
            raise InputDataError(dataset, f"cannot read image: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                 path=str(path)) from None
        if first is None:
            first = (path, img.shape)
        elif img.shape != first[1]:
            raise InputDataError(dataset, f"image is {_describe(img.shape)}, '{first[0]}' is {_describe(first[1])}; "
                                          "every image of a dataset must have the same size and channels",
                                 path=str(path))
        images.append(img)
    return np.stack(images)


def _describe(shape) -> str:
    return f"{shape[1]}x{shape[2]} pixels, {shape[0]} channel(s)"


def _container(dataset: str, images: np.ndarray, obs: pd.DataFrame, *, label_key: str, group_keys: Sequence[str],
               source: str, channels: Sequence[str] | None = None):
    import anndata as ad

    labels = obs[label_key]
    missing = labels.isna() | (labels.astype(str).str.strip() == "")
    if missing.any():
        raise InputDataError(dataset, f"{int(missing.sum())} image(s) have no label, the first "
                                      f"'{obs.index[np.flatnonzero(missing)[0]]}'", path=source)
    counts = labels.astype(str).value_counts()
    if (few := counts[counts < 2]).size:
        raise InputDataError(dataset, f"class '{few.index[0]}' has {int(few.iloc[0])} image; every class needs at "
                                      "least 2 (one to train on, one to test)", path=source)
    if not np.isfinite(images).all():
        raise InputDataError(dataset, "images hold NaN or infinite pixels", path=source)
    table = pd.DataFrame({keys.LABEL: labels.astype(str).to_numpy()}, index=obs.index.astype(str))
    for g in group_keys:
        table[g] = obs[g].astype(str).to_numpy()
    if table.index.has_duplicates:
        table.index = pd.Index([f"{i}_{n}" for n, i in enumerate(table.index)])
    n, c, h, w = images.shape
    out = ad.AnnData(X=images.reshape(n, -1).astype(np.float32), obs=table.astype("category"))
    out.uns[keys.UNS_KEY] = {IMAGE_KEY: {SHAPE_KEY: [c, h, w],
                                         CHANNELS_KEY: list(channels or [f"channel_{i}" for i in range(c)])}}
    return out


def read_folder(dataset: str, path: str | Path):
    """An ``ImageFolder`` tree: ``path/<class>/<image>``."""
    root = Path(path)
    if not root.is_dir():
        raise InputDataError(dataset, "image folder does not exist", path=str(root))
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    files = [(f, d.name) for d in classes for f in sorted(d.rglob("*")) if f.suffix.lower() in EXTENSIONS]
    if not files:
        raise InputDataError(dataset, f"no images ({', '.join(EXTENSIONS)}) in class sub-folders", path=str(root))
    obs = pd.DataFrame({keys.LABEL: [c for _, c in files]},
                       index=[str(f.relative_to(root)) for f, _ in files])
    return _container(dataset, _stack(dataset, [f for f, _ in files]), obs, label_key=keys.LABEL, group_keys=[],
                      source=str(root))


def read_table(dataset: str, path: str | Path, *, path_column: str = "path", label_column: str = "label",
               group_keys: Sequence[str] = ()):
    """A CSV/TSV of image paths (relative to the table's folder), labels and group columns."""
    table_path = Path(path)
    if not table_path.is_file():
        raise InputDataError(dataset, "image table does not exist", path=str(table_path))
    name = table_path.name.lower().removesuffix(".gz")
    sep = "\t" if name.endswith((".tsv", ".txt")) else ","
    try:
        table = pd.read_csv(table_path, sep=sep, dtype=str)
    except Exception as e:  # empty, not text, not a table
        raise InputDataError(dataset, f"cannot read the image table: {str(e).splitlines()[0]}",
                             path=str(table_path)) from None
    for role, col in (("path_column", path_column), ("label_column", label_column), *(("group_keys", g) for g in group_keys)):
        if col not in table.columns:
            raise InputDataError(dataset, f"image table has no column '{col}' ({role}; columns: "
                                          f"{', '.join(table.columns[:15])})", path=str(table_path))
    if table.empty:
        raise InputDataError(dataset, "image table has no rows", path=str(table_path))
    if (no_path := table[path_column].isna()).any():
        raise InputDataError(dataset, f"row {int(np.flatnonzero(no_path)[0]) + 2} has no image path",
                             path=str(table_path))
    files = [p if p.is_absolute() else table_path.parent / p for p in map(Path, table[path_column])]
    obs = table.set_index(path_column)
    return _container(dataset, _stack(dataset, files), obs, label_key=label_column, group_keys=group_keys,
                      source=str(table_path))


def read_npz(dataset: str, path: str | Path, *, images: str = "images", labels: str = "labels",
             group_keys: Sequence[str] = ()):
    """A NumPy archive of an image array, its labels and group arrays."""
    npz_path = Path(path)
    if not npz_path.is_file():
        raise InputDataError(dataset, "image archive does not exist", path=str(npz_path))
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except Exception as e:
        raise InputDataError(dataset, f"cannot read the archive: {e}", path=str(npz_path)) from None
    with archive:
        for role, name in (("images", images), ("labels", labels), *(("group_keys", g) for g in group_keys)):
            if name not in archive.files:
                raise InputDataError(dataset, f"archive has no array '{name}' ({role}; arrays: "
                                              f"{', '.join(archive.files)})", path=str(npz_path))
        try:
            a = archive[images]
            columns = {labels: archive[labels], **{g: archive[g] for g in group_keys}}
        except ValueError as e:  # object arrays need pickle, which is never loaded
            raise InputDataError(dataset, f"{e} (save labels and groups as strings, e.g. .astype(str))",
                                 path=str(npz_path)) from None
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and _channels_last(a.shape[1:]):
        a = np.moveaxis(a, -1, 1)
    if a.ndim != 4 or a.shape[0] == 0 or a.size == 0:
        raise InputDataError(dataset, f"array '{images}' has shape {a.shape}; expected cells x height x width "
                                      "[x channels] with at least one cell", path=str(npz_path))
    for name, values in columns.items():
        if len(values) != a.shape[0]:
            raise InputDataError(dataset, f"array '{name}' has {len(values)} entries for {a.shape[0]} images",
                                 path=str(npz_path))
    try:
        pixels = _scaled(a)
    except ValueError as e:
        raise InputDataError(dataset, f"array '{images}' has {e}", path=str(npz_path)) from None
    obs = pd.DataFrame({k: np.asarray(v, dtype=object) for k, v in columns.items()},
                       index=[f"image_{i}" for i in range(a.shape[0])])
    return _container(dataset, pixels, obs, label_key=labels, group_keys=group_keys, source=str(npz_path))
