"""The VAE's held-out placement: its own module, so the scanpy-environment jobs never import torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.integrate.methods import Integrated


def vae_heldout(adata, donor: str, *, vae: Mapping[str, Any], seed: int = 0) -> Integrated:
    """A VAE trained as train_vae trains one (``vae``: ``{"model": train.embedding, "trainer":
    train.trainer}``) on every cell but ``donor``'s, which it then encodes (their batch is one it
    knows): the embedding of all cells."""
    from cellatlas.deep.data import CSRTensors, SparseBatches
    from cellatlas.deep.embedding import LATENT, train_vae

    held = adata.obs[keys.DONOR].astype(str).to_numpy() == donor
    fit = adata[~held].copy()
    result = train_vae(fit, dataset="held-out fit", model=vae["model"], trainer=vae["trainer"], seed=seed)
    plan = result.plan.cpu()
    genes = adata.var_names.get_indexer(pd.Index(plan.hparams.genes))
    counts = sp.csr_matrix(adata.layers[keys.COUNTS_LAYER][:, genes], dtype=np.float32)
    codes = None
    if plan.hparams.n_batches:
        known = {b: i for i, b in enumerate(plan.hparams.batches)}
        codes = adata.obs[keys.BATCH].astype(str).map(known).fillna(plan.hparams.n_batches).to_numpy(np.int64)
    emb = np.empty((adata.n_obs, fit.obsm[LATENT].shape[1]), dtype=np.float32)
    emb[~held] = fit.obsm[LATENT]
    rows = np.flatnonzero(held)
    every = SparseBatches(CSRTensors.from_scipy(counts[rows]), np.arange(len(rows)),
                          covariate=None if codes is None else codes[rows], batch_size=4096)
    emb[rows] = plan.embed(every)
    return Integrated("vae", embedding=emb, info={"epochs": float(result.summary().get("epochs", np.nan))})
