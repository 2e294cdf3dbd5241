"""The image_ingest rule: an image dataset read (or simulated), checked, and shown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cellatlas import keys, plotting
from cellatlas.errors import InputDataError
from cellatlas.stage import DatasetInput, Result, plot

from cellatlas.images import image_shape


def read_images(dataset: str, source: Mapping[str, Any], *, group_keys, seed: int = 0):
    """The dataset's images (its ``images.datasets.<d>.source``) as the pipeline's container
    (:mod:`cellatlas.images`)."""
    from cellatlas.images import read

    source = dict(source)
    kind = source.pop("kind")
    if kind == "simulate":
        from dataclasses import fields

        from cellatlas.images.simulate import ImageSimulation, simulate_images

        if odd := sorted(set(source) - {f.name for f in fields(ImageSimulation)}):
            raise InputDataError(dataset, f"a simulated source takes no {', '.join(odd)} (images.datasets.{dataset}.source)")
        source.setdefault("seed", seed)
        return simulate_images(**source)
    if kind == "folder":
        if group_keys:
            raise InputDataError(dataset, f"an image folder has no group columns ({', '.join(group_keys)}); use a "
                                          "table of image paths for groups", path=source["path"])
        return read.read_folder(dataset, source["path"])
    if kind == "table":
        return read.read_table(dataset, source["path"], path_column=source.get("path_column", "path"),
                               label_column=source.get("label_column", "label"), group_keys=group_keys)
    return read.read_npz(dataset, source["path"], images=source.get("images", "images"),
                         labels=source.get("labels", "labels"), group_keys=group_keys)


def ingest_images_stage(dataset: str, source: Mapping[str, Any], *, group_keys, seed: int = 0) -> Result:
    """The image_ingest rule: read (or simulate) the images, count them per class, show some."""
    adata = read_images(dataset, source, group_keys=group_keys, seed=seed)
    shape = image_shape(adata)
    labels = adata.obs[keys.LABEL].astype(str)
    classes = labels.value_counts().rename_axis("label").reset_index(name="n_images")
    metrics: dict[str, Any] = {"n_images": adata.n_obs, "n_classes": len(classes), "channels": shape[0],
                               "height": shape[1], "width": shape[2]}
    for g in group_keys:
        metrics[f"n_{g}"] = int(adata.obs[g].nunique())
    notes = [] if group_keys else [f"dataset '{dataset}': no group columns; its cross-validation splits single "
                                   "images, and its scores may be optimistic for a new experiment"]
    # a table or archive is logged as the run's input (with its digest); a folder of images is not one file
    inputs = [DatasetInput(dataset, source["path"])] if source["kind"] in ("table", "npz") else []
    images = adata.X.reshape(adata.n_obs, *shape)
    return Result(metrics=metrics, data={"h5ad": adata}, tables={"classes": classes}, inputs=inputs, notes=notes,
                  figures={"montage": plot(plotting.image_montage, images, labels.to_numpy(),
                                           title=f"{dataset}: {adata.n_obs} images, {len(classes)} classes")})
