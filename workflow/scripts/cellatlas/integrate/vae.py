"""The VAE methods that train inside the integrate_vae job: its own module, so the
scanpy-environment jobs never import torch.

* the held-out fits of ``vae`` and ``vae_labels``: a VAE trained without one donor, which it
  then encodes;
* ``vae_labels``: the VAE trained with a classifier on its latent space, scANVI's semi-supervised
  use of labels (:class:`~cellatlas.deep.plans.VAEPlan` with ``n_classes``). Its biological
  conservation on the cells whose labels it learned is optimistic by construction; its held-out
  donor's scores are the fair ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.integrate.methods import Integrated


def fit_and_encode(adata, held: np.ndarray, *, method: str, vae: Mapping[str, Any], params: Mapping[str, Any],
                   seed: int = 0) -> Integrated:
    """A VAE trained as train_vae trains one (``vae``: ``{"model": train.embedding, "trainer":
    train.trainer}``; ``vae_labels`` adds the classifier with ``params["classification_weight"]``)
    on the cells not ``held``, then every cell encoded (the held cells' batches are ones it knows)."""
    from cellatlas.deep.data import CSRTensors, SparseBatches
    from cellatlas.deep.embedding import LATENT, train_vae

    fit = adata[~held].copy()
    weight = float(params.get("classification_weight", 1.0)) if method == "vae_labels" else None
    result = train_vae(fit, dataset=str(adata.uns.get("dataset", "held-out fit")), model=vae["model"],
                       trainer=vae["trainer"], seed=seed, classification_weight=weight)
    plan = result.plan.cpu()
    emb = np.empty((adata.n_obs, fit.obsm[LATENT].shape[1]), dtype=np.float32)
    emb[~held] = fit.obsm[LATENT]
    rows = np.flatnonzero(held)
    if len(rows):
        genes = adata.var_names.get_indexer(pd.Index(plan.hparams.genes))
        counts = sp.csr_matrix(adata.layers[keys.COUNTS_LAYER][rows][:, genes], dtype=np.float32)
        codes = None
        if plan.hparams.n_batches:
            known = {b: i for i, b in enumerate(plan.hparams.batches)}
            codes = (adata.obs[keys.BATCH].astype(str).iloc[rows].map(known).fillna(plan.hparams.n_batches)
                     .to_numpy(np.int64))
        every = SparseBatches(CSRTensors.from_scipy(counts), np.arange(len(rows)), covariate=codes, batch_size=4096)
        emb[rows] = plan.embed(every)
    summary = result.summary()
    return Integrated(method, embedding=emb, info={"epochs": float(summary["epochs"]),
                                                   "best_epoch": float(summary["best_epoch"])})


def vae_labels(adata, *, vae: Mapping[str, Any], params: Mapping[str, Any], seed: int = 0) -> Integrated:
    """The semi-supervised VAE on every cell."""
    return fit_and_encode(adata, np.zeros(adata.n_obs, bool), method="vae_labels", vae=vae, params=params, seed=seed)


def vae_heldout(adata, donor: str, *, method: str = "vae", vae: Mapping[str, Any],
                params: Mapping[str, Any] | None = None, seed: int = 0) -> Integrated:
    """``method`` (vae or vae_labels) trained without ``donor``'s cells, which it then encodes."""
    held = adata.obs[keys.DONOR].astype(str).to_numpy() == donor
    return fit_and_encode(adata, held, method=method, vae=vae, params=params or {}, seed=seed)
