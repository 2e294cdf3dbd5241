"""A seeded simulator of cell images from a screen: crops of single cells, plates, wells and fields.

What the tests and the default config need of image data, as high-content screens have it:

* cells of each class differ in shape and texture: the nucleus's size and elongation, a granular
  texture, and how much of the cell the cytoplasm fills (channel 0: nucleus stain, channel 1:
  cytoplasm stain);
* the class is a well's treatment (every cell of a well has the well's class; every plate holds
  every class), as it is in a drug screen;
* every well has its own staining: a brightness and contrast, a background and a faint pattern
  of its own (``group_effect`` scales them). A model can learn a well's look, so cells of one
  well on both sides of a split score better than a new plate will;
* every cell is rotated, shifted and noisy.

Returns an AnnData whose rows are cells and whose ``X`` holds each crop's pixels (channels x
height x width, flattened; values in [0, 1]), the shape in ``uns["cellatlas"]["image"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ImageSimulation:
    n_classes: int = 3
    n_plates: int = 4
    #: wells per plate and class
    wells_per_class: int = 2
    fields_per_well: int = 2
    cells_per_field: int = 12
    size: int = 32
    seed: int = 0
    #: how much wells differ in staining (0: not at all)
    group_effect: float = 1.0
    #: how much the classes differ in shape and texture (0: not at all; at 0.6 the small CNN scores
    #: macro-F1 0.76 on new plates and 0.90 on a random split, benchmarks/RESULTS.md)
    class_effect: float = 0.6
    noise: float = 0.05


def _blob(yy, xx, cy, cx, ry, rx, angle):
    """A soft-edged ellipse, 1 inside and 0 outside."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp((r - 1.0) * 8.0))


def simulate_images(params: ImageSimulation | None = None, **overrides):
    """Simulated single-cell crops (see the module's docstring); ``overrides`` replace ``params``' fields."""
    import anndata as ad

    from cellatlas import keys
    from cellatlas.images import CHANNELS_KEY, IMAGE_KEY, SHAPE_KEY

    p = params or ImageSimulation()
    if overrides:
        p = ImageSimulation(**{**p.__dict__, **overrides})
    rng = np.random.default_rng(p.seed)
    size = p.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # per class: nucleus radius, elongation, granularity, cytoplasm extent (as shares of the crop)
    radius = 0.16 + 0.035 * p.class_effect * np.arange(p.n_classes) / max(p.n_classes - 1, 1) * 2
    elongation = 1.0 + 0.5 * p.class_effect * (np.arange(p.n_classes) % 2)
    granular = 0.6 * p.class_effect * (np.arange(p.n_classes) == p.n_classes - 1)
    cytoplasm = 1.9 + 0.5 * p.class_effect * ((np.arange(p.n_classes) + 1) % 3 == 0)

    images, rows = [], []
    for plate in range(p.n_plates):
        wells = [(c, w) for c in range(p.n_classes) for w in range(p.wells_per_class)]
        for well, (cls, _) in enumerate(wells):
            gain = np.exp(rng.normal(0.0, 0.25 * p.group_effect))
            offset = abs(rng.normal(0.0, 0.05 * p.group_effect))
            # a faint stripe pattern of the well's own (uneven illumination, a stain artefact)
            freq, phase = rng.uniform(0.15, 0.6, 2), rng.uniform(0, 2 * np.pi, 2)
            pattern = 0.08 * p.group_effect * np.sin(freq[0] * yy + freq[1] * xx + phase[0])
            for field in range(p.fields_per_well):
                for cell in range(p.cells_per_field):
                    cy, cx = size / 2 + rng.normal(0, size * 0.04, 2)
                    angle = rng.uniform(0, np.pi)
                    r = size * radius[cls] * np.exp(rng.normal(0, 0.08))
                    e = elongation[cls] * np.exp(rng.normal(0, 0.08))
                    nucleus = _blob(yy, xx, cy, cx, r * e, r / np.sqrt(e), angle)
                    grains = 1.0 - granular[cls] * (rng.random((size, size)) < 0.25)
                    nucleus = nucleus * (0.8 + 0.2 * rng.random()) * grains
                    c = r * cytoplasm[cls] * np.exp(rng.normal(0, 0.08))
                    cyto = _blob(yy, xx, cy + rng.normal(0, 1), cx + rng.normal(0, 1), c * 1.1, c, angle + rng.normal(0, 0.3))
                    cyto = 0.5 * cyto * (1 - 0.6 * nucleus)
                    img = np.stack([nucleus, cyto]) * gain + offset + pattern
                    img += rng.normal(0, p.noise, img.shape)
                    images.append(np.clip(img, 0.0, 1.0).astype(np.float32))
                    rows.append((f"class_{cls}", f"plate_{plate}", f"plate_{plate}_well_{well}",
                                 f"plate_{plate}_well_{well}_field_{field}"))
    obs = pd.DataFrame(rows, columns=[keys.LABEL, "plate", "well", "field"],
                       index=[f"cell_{i}" for i in range(len(rows))]).astype("category")
    X = np.stack(images).reshape(len(images), -1)
    out = ad.AnnData(X=X, obs=obs)
    out.uns[keys.UNS_KEY] = {IMAGE_KEY: {SHAPE_KEY: [2, size, size], CHANNELS_KEY: ["nucleus", "cytoplasm"]}}
    return out
