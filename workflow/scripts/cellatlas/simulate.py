"""A seeded simulator of single-cell UMI counts with known cell types, donors and batches.

Counts are negative binomial (a gamma-Poisson mixture, as droplet UMI counts are well
described by), with the structure real atlases have and tests need:

* cell types differ through a set of marker genes with log-fold changes;
* every donor shifts each gene's mean a little (donor effect, so grouped splits matter);
* every batch shifts gene means and library sizes (batch effect, so batch-aware HVG matters);
* optionally, every donor has its own version of each type (``donor_type_sd``): what a model
  can memorize when one donor's cells sit on both sides of a train/test split;
* optionally, a continuous gene program (``program_genes``) whose activity per cell is
  recorded in ``obs["program"]`` with measurement noise: a quantity to regress on;
* library sizes vary log-normally, a few genes are mitochondrial (``MT-``) or ribosomal
  (``RPS``/``RPL``), and an optional fraction of cells are doublets (sum of two cells).

Rows are generated in blocks straight into CSR so that 100,000+ cells fit in memory, and
:func:`write_simulated` streams them to an h5ad file for inputs larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class SimulationParams:
    n_cells: int = 3000
    n_genes: int = 2000
    n_types: int = 6
    n_donors: int = 4
    n_batches: int = 2
    seed: int = 0
    #: fraction of genes that are markers of each type
    marker_fraction: float = 0.03
    #: mean log-fold change of a marker gene in its type
    marker_lfc: float = 2.0
    #: sd of the per-donor, per-gene log-mean shift
    donor_sd: float = 0.15
    #: sd of the per-batch, per-gene log-mean shift
    batch_sd: float = 0.2
    #: median UMIs per cell
    library_size: float = 2500.0
    #: NB inverse dispersion (larger: closer to Poisson)
    theta: float = 5.0
    doublet_rate: float = 0.0
    n_mito: int = 13
    n_ribo: int = 20
    #: sd of the per-donor, per-type, per-gene log-mean shift (0: donors share each type's profile)
    donor_type_sd: float = 0.0
    #: genes of a continuous program; its per-cell activity (0..1, plus noise) is ``obs["program"]``
    program_genes: int = 0
    #: log-fold change of a program gene at full activity
    program_lfc: float = 1.5


def simulate_counts(params: SimulationParams | None = None, **kwargs) -> "anndata.AnnData":  # noqa: F821
    """Simulate a counts AnnData.

    Returns
    -------
    AnnData with CSR float32 counts in ``X`` and ``obs`` columns ``cell_type``, ``donor``,
    ``batch`` and ``is_doublet`` (ground truth), plus ``program`` when ``program_genes > 0``;
    ``uns["simulation"]`` holds the parameters.
    """
    import anndata as ad

    p = params if params is not None else SimulationParams(**kwargs)
    obs, var, rows = _simulation(p)
    return ad.AnnData(X=sp.vstack(list(rows), format="csr"), obs=obs, var=var, uns={"simulation": dict(p.__dict__)})


def write_simulated(path: str, params: SimulationParams | None = None, **kwargs) -> None:
    """Write what :func:`simulate_counts` returns to the h5ad file ``path``, block by block of cells
    (anndata's on-disk sparse append), holding one block in memory: inputs of any size."""
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    p = params if params is not None else SimulationParams(**kwargs)
    obs, var, rows = _simulation(p)
    ad.AnnData(obs=obs, var=var, uns={"simulation": dict(p.__dict__)}).write_h5ad(path)  # all but X
    with h5py.File(path, "a") as f:
        X = None
        for block in rows:
            if X is None:
                # 64-bit offsets from the start: a million cells pass 2**31 nonzeros
                write_elem(f, "X", sp.csr_matrix((block.data, block.indices, block.indptr.astype(np.int64)),
                                                 shape=block.shape))
                X = sparse_dataset(f["X"])
            else:
                X.append(block)
    ad.read_h5ad(path, backed="r").file.close()  # readable as anndata writes it, or fail here


def _simulation(p: SimulationParams):
    """``(obs, var, blocks)``: the cells' annotation and a generator of CSR float32 count blocks
    (rows in order), drawn from one seeded stream in the order the blocks are consumed."""
    check(p)
    rng = np.random.default_rng(p.seed)
    n_special = p.n_mito + p.n_ribo
    gene_names = (
        [f"MT-SIM{i + 1}" for i in range(p.n_mito)]
        + [f"RP{'S' if i % 2 else 'L'}{i + 1}" for i in range(p.n_ribo)]
        + [f"GENE{i + 1:05d}" for i in range(p.n_genes - n_special)]
    )

    # baseline gene expression: log-normal relative abundances, a heavy right tail like real genes
    log_base = rng.normal(0.0, 1.5, p.n_genes)
    log_base[: p.n_mito] += 3.0  # mitochondrial transcripts are abundant
    log_base[p.n_mito : n_special] += 2.5
    type_lfc = np.zeros((p.n_types, p.n_genes))
    n_markers = max(1, int(p.marker_fraction * (p.n_genes - n_special)))
    for t in range(p.n_types):
        markers = rng.choice(np.arange(n_special, p.n_genes), n_markers, replace=False)
        type_lfc[t, markers] = rng.normal(p.marker_lfc, 0.5, n_markers).clip(0.5)
    donor_lfc = rng.normal(0.0, p.donor_sd, (p.n_donors, p.n_genes))
    batch_lfc = rng.normal(0.0, p.batch_sd, (p.n_batches, p.n_genes))
    batch_depth = np.exp(rng.normal(0.0, 0.3, p.n_batches))

    # unequal type frequencies, as in real tissues
    type_freq = rng.dirichlet(np.full(p.n_types, 2.0))
    cell_type = rng.choice(p.n_types, p.n_cells, p=type_freq)
    donor = rng.integers(0, p.n_donors, p.n_cells)
    # donors are nested in batches (each donor sequenced in one batch), as in most atlases
    batch = donor % p.n_batches
    size = p.library_size * batch_depth[batch] * np.exp(rng.normal(0.0, 0.35, p.n_cells))

    def means(types: np.ndarray, donors: np.ndarray, batches: np.ndarray, sizes: np.ndarray, act: np.ndarray):
        logit = log_base + type_lfc[types] + donor_lfc[donors] + batch_lfc[batches]
        if donor_type_lfc is not None:
            logit = logit + donor_type_lfc[donors, types]
        if p.program_genes:
            logit[:, program_idx] += p.program_lfc * act[:, None]
        rel = np.exp(logit - logit.max(axis=1, keepdims=True))
        rel /= rel.sum(axis=1, keepdims=True)
        return rel * sizes[:, None]

    n_doublets = int(round(p.doublet_rate * p.n_cells))
    is_doublet = np.zeros(p.n_cells, dtype=bool)
    is_doublet[rng.choice(p.n_cells, n_doublets, replace=False)] = True
    partner_type = rng.choice(p.n_types, p.n_cells, p=type_freq)

    # optional structure draws from its own stream, so the defaults reproduce earlier data exactly
    extra = np.random.default_rng([p.seed, 1])
    donor_type_lfc = (
        extra.normal(0.0, p.donor_type_sd, (p.n_donors, p.n_types, p.n_genes)).astype(np.float32)
        if p.donor_type_sd > 0
        else None
    )
    program_idx = np.sort(extra.choice(np.arange(n_special, p.n_genes), p.program_genes, replace=False))
    activity = extra.uniform(0.0, 1.0, p.n_cells)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
            "donor": pd.Categorical([f"donor_{d}" for d in donor]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "is_doublet": is_doublet,
        },
        index=pd.Index([f"cell{i:07d}" for i in range(p.n_cells)]),
    )
    if p.program_genes:
        # the measured quantity: activity plus assay noise (what a protein or viability readout gives)
        obs["program"] = (activity + extra.normal(0.0, 0.05, p.n_cells)).astype(np.float32)
    var = pd.DataFrame(index=pd.Index(gene_names))

    def blocks():
        chunk = max(1, 2_000_000 // p.n_genes)
        for start in range(0, p.n_cells, chunk):
            sl = slice(start, min(start + chunk, p.n_cells))
            mu = means(cell_type[sl], donor[sl], batch[sl], size[sl], activity[sl])
            dbl = is_doublet[sl]
            if dbl.any():
                mu[dbl] += means(partner_type[sl][dbl], donor[sl][dbl], batch[sl][dbl], size[sl][dbl],
                                 activity[sl][dbl])
            lam = rng.gamma(p.theta, mu / p.theta)
            yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))

    return obs, var, blocks()


def estimate_bytes(p: SimulationParams) -> float:
    """Peak memory of simulating ``p`` and ingesting it: a 500-cell pilot's nonzeros per cell, scaled
    (CSR of float32 values and int32 indices, held about three times: the chunks, the stacked
    matrix, the canonical copy), plus the per-donor type profiles."""
    import dataclasses

    pilot = simulate_counts(dataclasses.replace(p, n_cells=min(p.n_cells, 500)))
    per_cell = pilot.X.nnz / pilot.n_obs
    profiles = 4.0 * p.n_donors * p.n_types * p.n_genes if p.donor_type_sd > 0 else 0.0
    return 3 * 8.0 * per_cell * p.n_cells + 200.0 * p.n_cells + profiles


def check(p: SimulationParams) -> None:
    """Raise ValueError for parameters the simulator cannot honour (the config check names the key)."""
    if p.n_genes <= p.n_mito + p.n_ribo + p.n_types:
        raise ValueError(f"n_genes must exceed {p.n_mito + p.n_ribo + p.n_types}")
    if p.n_cells < 1 or p.n_types < 1 or p.n_donors < 1 or p.n_batches < 1:
        raise ValueError("n_cells, n_types, n_donors and n_batches must be positive")
    if p.n_batches > p.n_donors:
        raise ValueError("n_batches cannot exceed n_donors (donors are nested in batches)")
    if not 0 <= p.program_genes <= p.n_genes - p.n_mito - p.n_ribo:
        raise ValueError("program_genes must be between 0 and the number of ordinary genes")
    if not 0.0 <= p.doublet_rate < 0.5:
        raise ValueError("doublet_rate must be in [0, 0.5)")
