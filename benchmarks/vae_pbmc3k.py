"""How close the VAE embedding's Leiden clusters come to the PCA embedding's on PBMC 3k.

    python benchmarks/vae_pbmc3k.py                    # every variant, seeds 0-4
    python benchmarks/vae_pbmc3k.py --variants default pearson_kl_0.1 --seeds 0
    python benchmarks/vae_pbmc3k.py --variants --context --ensembles pearson_kl_0.1 --seeds $(seq 0 14)
    python benchmarks/vae_pbmc3k.py --variants --neighbors 10 15 30 --seeds $(seq 0 14)

The pipeline runs once up to the cluster stage on ``../shared/data/pbmc3k`` (the tutorials' QC,
under which ``celltype_seurat`` was made). Then, for each variant of ``train.embedding`` and each
seed, the VAE is trained exactly as the ``train_vae`` job trains it (``cellatlas.deep.embedding``)
and its latent space is clustered like the PCA embedding (kNN graph with ``embed.n_neighbors``,
igraph Leiden) over a grid of resolutions, so both embeddings get the same chances. ARI is against
``celltype_seurat``. Writes benchmarks/out/vae_pbmc3k/{ari.tsv,summary.tsv}; a run of some variants
keeps the rows of the others already there, and each trained latent space is saved (``latent/``).
``--context`` adds how far the PCA side moves with its own choices (number of PCs, Leiden seed,
Pearson-residual PCA); ``--ensembles`` clusters disjoint groups of saved latent spaces side by side;
``--neighbors`` clusters PCA and the same saved latent spaces on kNN graphs of other sizes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))
sys.path.insert(0, str(HERE.parent / "tests"))

from workflow_utils import make_workdir, snakemake  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data" / "pbmc3k" / "pbmc3k_counts_labelled.h5ad"
#: fine enough that neither embedding's best falls between two grid points
RESOLUTIONS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0]
#: the pipeline's cluster.resolutions default: what the train_vae job itself reports
DEFAULT_RESOLUTIONS = [0.5, 1.0]

# train.embedding overrides
VARIANTS: dict[str, dict] = {
    "default": {},
    "pearson_kl_0.25": {"genes": "pearson_residuals", "kl_weight": 0.25},
    "pearson_kl_0.1": {"genes": "pearson_residuals", "kl_weight": 0.1},
    "pearson_kl_0.05": {"genes": "pearson_residuals", "kl_weight": 0.05},
    "pearson_kl_0.1_hidden_256x2": {"genes": "pearson_residuals", "kl_weight": 0.1, "hidden": 256, "n_layers": 2},
    # at 100 epochs the validation loss is still falling
    "pearson_kl_0.1_epochs_200": {"genes": "pearson_residuals", "kl_weight": 0.1, "max_epochs": 200, "patience": 20},
    "pearson_kl_0.1_latent_20": {"genes": "pearson_residuals", "kl_weight": 0.1, "n_latent": 20},
    "pearson_kl_0.1_latent_30": {"genes": "pearson_residuals", "kl_weight": 0.1, "n_latent": 30},
    "pearson_kl_0.1_scaled": {"genes": "pearson_residuals", "kl_weight": 0.1, "encoder_input": "scaled"},
    "pearson_kl_0.1_val_0": {"genes": "pearson_residuals", "kl_weight": 0.1, "val_fraction": 0.0},
    "pearson_kl_0.1_batch_256": {"genes": "pearson_residuals", "kl_weight": 0.1, "batch_size": 256},
    "pearson_kl_0.1_dropout_0": {"genes": "pearson_residuals", "kl_weight": 0.1, "dropout": 0.0},
    "pearson_kl_0.1_lr_3e-3": {"genes": "pearson_residuals", "kl_weight": 0.1, "lr": 0.003},
    "pearson_kl_0.1_lr_3e-4_epochs_200": {"genes": "pearson_residuals", "kl_weight": 0.1, "lr": 0.0003, "max_epochs": 200,
                                          "patience": 20},
}


def pipeline_config(embedding: dict | None = None) -> dict:
    """The config of the run to the cluster stage; ``embedding``: a train.embedding variant."""
    return {
        "datasets": {"pbmc3k": {"source": {"kind": "h5ad", "path": str(SHARED)}, "label_key": "celltype_seurat"}},
        "qc": {"mode": "fixed", "fixed": {"min_genes": 200, "max_genes": 2500, "max_pct_mt": 5}},
        "cluster": {"marker_method": "t-test"},
        "classify": {"tasks": {}},
        "train": {"embedding": {"datasets": [], **(embedding or {})}},
    }


def cluster_h5ad(out: Path) -> Path:
    path = out / "w" / "results" / "pbmc3k" / "cluster.h5ad"
    if path.exists():
        return path
    w = make_workdir(out / "w", pipeline_config())
    r = snakemake(w, "--cores", "all", "results/pbmc3k/cluster.h5ad")
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    return path


def model_config(variant: dict) -> dict:
    """train.embedding with ``variant`` over the schema's defaults, validated as the workflow validates it."""
    from cellatlas.config import SCHEMA, validate

    config = validate(pipeline_config(variant), SCHEMA)
    return config["train"]["embedding"]


def leiden_ari(adata, rep: str | None, n_neighbors: int, seed: int = 0) -> dict[float, tuple[float, int]]:
    """{resolution: (ARI against obs["label"], clusters)}, clustered as the cluster stage clusters."""
    import scanpy as sc

    from cellatlas.cluster import agreement, leiden

    if rep is not None:
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=rep, random_state=seed)
    leiden(adata, resolutions=RESOLUTIONS, seed=seed)
    table = agreement(adata, resolutions=RESOLUTIONS)
    return {row.resolution: (row.ari, row.n_clusters) for row in table.itertuples(index=False)}


def kept_rows(path: Path, rerun: set[tuple[str, int]]) -> list[dict]:
    """The VAE rows of an earlier ``ari.tsv`` that this run does not redo, so that runs of a few
    variants add up to one table; rows measured on another resolution grid are dropped."""
    import pandas as pd

    if not path.exists():
        return []
    old = pd.read_csv(path, sep="\t", keep_default_na=False)
    old = old[old["embedding"] == "vae"]
    keep = []
    for (variant, seed), rows in old.groupby(["variant", "seed"]):
        if (variant, seed) not in rerun and variant in VARIANTS and sorted(rows["resolution"]) == RESOLUTIONS:
            keep += rows.to_dict("records")
    return keep


def best_ari(obs, z, n_neighbors: int, seed: int = 0) -> tuple[float, float]:
    """(best ARI over the grid, its resolution) of the Leiden clusters of embedding ``z``."""
    import anndata as ad
    import numpy as np

    emb = ad.AnnData(obs=obs[["label"]].copy(), obsm={"X": np.ascontiguousarray(z, dtype=np.float32)})
    r, (ari, _) = max(leiden_ari(emb, "X", n_neighbors, seed).items(), key=lambda kv: kv[1][0])
    return ari, r


def context_rows(base, n_neighbors: int) -> list[dict]:
    """How much the PCA side's own figure moves: the embed stage's PCA cut to fewer PCs, with
    other Leiden seeds, and scanpy's Pearson-residual PCA on the genes the Pearson VAE reads."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    from cellatlas import keys
    from cellatlas.deep.embedding import pearson_residual_genes

    rows = []
    pcs = base.obsm["X_pca"]
    for n in (10, 20, 30, pcs.shape[1]):
        ari, r = best_ari(base.obs, pcs[:, :n], n_neighbors)
        rows.append({"embedding": f"PCA, first {n} PCs", "leiden_seed": 0, "best_ari": ari, "resolution": r})
    for seed in range(1, 10):
        ari, r = best_ari(base.obs, pcs, n_neighbors, seed)
        rows.append({"embedding": f"PCA, first {pcs.shape[1]} PCs", "leiden_seed": seed, "best_ari": ari, "resolution": r})
    mask = pearson_residual_genes(base, int(base.var["highly_variable"].sum()))
    counts = ad.AnnData(sp.csr_matrix(base.layers[keys.COUNTS_LAYER][:, mask], dtype=np.float32))
    sc.experimental.pp.normalize_pearson_residuals(counts)
    sc.pp.pca(counts, n_comps=50, random_state=0)
    ari, r = best_ari(base.obs, counts.obsm["X_pca"], n_neighbors)
    rows.append({"embedding": "Pearson-residual PCA, 50 PCs", "leiden_seed": 0, "best_ari": ari, "resolution": r})
    return rows


def ensemble_rows(base, latent_dir: Path, variant: str, seeds: list[int], sizes: list[int], n_neighbors: int) -> list[dict]:
    """Disjoint groups of ``size`` consecutive seeds of ``variant``: their saved latent spaces side
    by side (the squared distance is the sum of the members'), clustered like one embedding."""
    import numpy as np

    latents = {s: np.load(latent_dir / f"{variant}_seed{s}.npy") for s in seeds}
    rows = []
    for size in sizes:
        for i in range(0, len(seeds) - size + 1, size):
            group = seeds[i:i + size]
            ari, r = best_ari(base.obs, np.concatenate([latents[s] for s in group], axis=1), n_neighbors)
            rows.append({"variant": variant, "size": size, "seeds": " ".join(map(str, group)), "best_ari": ari,
                         "resolution": r})
    return rows


def neighbor_rows(base, latent_dir: Path, variant: str, seeds: list[int], counts: list[int]) -> list[dict]:
    """The PCA embedding and each saved latent space of ``variant`` on kNN graphs of ``counts``
    neighbours (both embeddings alike; include the pipeline's ``embed.n_neighbors`` to compare)."""
    import numpy as np

    latents = {s: np.load(latent_dir / f"{variant}_seed{s}.npy") for s in seeds}
    rows = []
    for k in counts:
        ari, r = best_ari(base.obs, base.obsm["X_pca"], k)
        rows.append({"n_neighbors": k, "embedding": "pca", "seed": 0, "best_ari": ari, "resolution": r})
        for s in seeds:
            ari, r = best_ari(base.obs, latents[s], k)
            rows.append({"n_neighbors": k, "embedding": variant, "seed": s, "best_ari": ari, "resolution": r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="variants to train (none: only the analyses below, on what is saved)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--context", action="store_true", help="also write context.tsv: the PCA side's own spread")
    ap.add_argument("--ensembles", metavar="VARIANT", choices=list(VARIANTS),
                    help="also write ensembles.tsv: groups of 3 and 5 of --seeds of VARIANT's saved latent spaces")
    ap.add_argument("--neighbors", type=int, nargs="+", metavar="K",
                    help="also write neighbors.tsv: PCA and --latents' saved latent spaces on K-neighbour graphs")
    ap.add_argument("--latents", metavar="VARIANT", choices=list(VARIANTS), default="pearson_kl_0.1",
                    help="the variant whose saved latent spaces (of --seeds) --neighbors clusters")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "vae_pbmc3k")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} is not present")
    (args.out / "latent").mkdir(parents=True, exist_ok=True)

    import anndata as ad
    import numpy as np
    import pandas as pd

    from cellatlas.deep.embedding import LATENT, train_vae

    base = ad.read_h5ad(cluster_h5ad(args.out))
    n_neighbors = int(base.uns["neighbors"]["params"]["n_neighbors"])
    rows = kept_rows(args.out / "ari.tsv", {(v, s) for v in args.variants for s in args.seeds})
    for r, (ari, n) in leiden_ari(base.copy(), None, n_neighbors).items():  # the embed stage's own PCA graph
        rows.append({"embedding": "pca", "variant": "", "seed": 0, "resolution": r, "ari": ari, "n_clusters": n})
    for name in args.variants:
        for seed in args.seeds:
            a = base.copy()
            t0 = time.perf_counter()
            result = train_vae(a, dataset="pbmc3k", model=model_config(VARIANTS[name]),
                               trainer={"accelerator": "cpu", "deterministic": True}, seed=seed)
            seconds = time.perf_counter() - t0
            emb = ad.AnnData(obs=a.obs[["label"]].copy(), obsm={LATENT: a.obsm[LATENT]})
            np.save(args.out / "latent" / f"{name}_seed{seed}.npy", a.obsm[LATENT])  # for studies of the latents
            for r, (ari, n) in leiden_ari(emb, LATENT, n_neighbors).items():
                rows.append({"embedding": "vae", "variant": name, "seed": seed, "resolution": r, "ari": ari,
                             "n_clusters": n, "epochs": result.epochs, "train_seconds": seconds})
            print(name, seed, " ".join(f"{row['resolution']:g}:{row['ari']:.3f}" for row in rows[-len(RESOLUTIONS):]),
                  flush=True)
            pd.DataFrame(rows).to_csv(args.out / "ari.tsv", sep="\t", index=False)  # a long run keeps what it measured
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "ari.tsv", sep="\t", index=False)
    if args.context:
        context = pd.DataFrame(context_rows(base, n_neighbors))
        context.to_csv(args.out / "context.tsv", sep="\t", index=False)
        print(context.round(3).to_string(index=False))

    def require_latents(variant: str) -> None:
        missing = [s for s in args.seeds if not (args.out / "latent" / f"{variant}_seed{s}.npy").exists()]
        if missing:
            sys.exit(f"no saved latent space of {variant} for seeds {missing}: train them first (--variants {variant})")

    if args.ensembles:
        require_latents(args.ensembles)
        ensembles = pd.DataFrame(ensemble_rows(base, args.out / "latent", args.ensembles, args.seeds, [3, 5], n_neighbors))
        ensembles.to_csv(args.out / "ensembles.tsv", sep="\t", index=False)
        print(ensembles.round(3).to_string(index=False))
    if args.neighbors:
        require_latents(args.latents)
        table_k = pd.DataFrame(neighbor_rows(base, args.out / "latent", args.latents, args.seeds, args.neighbors))
        table_k.to_csv(args.out / "neighbors.tsv", sep="\t", index=False)
        print(table_k.groupby(["n_neighbors", "embedding"])["best_ari"].agg(["mean", "std", "size"]).round(3))

    def best(df: pd.DataFrame, grid: list[float]) -> pd.Series:
        return df[df["resolution"].isin(grid)].groupby(["embedding", "variant", "seed"])["ari"].max()

    per_seed = pd.DataFrame({"best_ari_grid": best(table, RESOLUTIONS),
                             "best_ari_default_resolutions": best(table, DEFAULT_RESOLUTIONS)}).reset_index()
    summary = per_seed.groupby(["embedding", "variant"]).agg(
        seeds=("seed", "size"), best_ari_grid_mean=("best_ari_grid", "mean"), best_ari_grid_sd=("best_ari_grid", "std"),
        best_ari_grid_min=("best_ari_grid", "min"), best_ari_grid_max=("best_ari_grid", "max"),
        best_ari_default_mean=("best_ari_default_resolutions", "mean")).reset_index()
    pca = float(summary.loc[summary["embedding"] == "pca", "best_ari_grid_mean"].iloc[0])
    summary["gap_to_pca"] = pca - summary["best_ari_grid_mean"]
    summary.to_csv(args.out / "summary.tsv", sep="\t", index=False)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, CPU")
    print(summary.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
