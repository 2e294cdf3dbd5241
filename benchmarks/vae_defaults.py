"""What the VAE's gene and KL choices cost where there are batches: ARI and batch mixing on simulations.

    python benchmarks/vae_defaults.py

On PBMC 3k (one batch) Pearson-residual genes with a KL weight of 0.1 beat the defaults
(``benchmarks/vae_pbmc3k.py``). This asks what those choices do on data with batches: the default
run's ``sim`` (3,000 cells, 2 batches, ``train.embedding.max_epochs`` 60) and the workflow test's
``sim5k`` (5,200 cells, 2 weak batches) at 8, 20 and 30 epochs. Each dataset is run once to the
cluster stage; each variant is then trained as the ``train_vae`` job trains it (CPU, 32-bit, seed 0)
and clustered with the job's own code (``cluster_embedding``: ARI at the config's resolutions,
and the batch mixing of the kNN graph, 1 = as mixed as random neighbours). Writes
benchmarks/out/vae_defaults/results.tsv.
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))
sys.path.insert(0, str(HERE.parent / "tests"))

from workflow_utils import make_workdir, snakemake  # noqa: E402

#: train.embedding overrides
VARIANTS = {
    "hvg, KL 1 (defaults)": {},
    "hvg, KL 0.1": {"kl_weight": 0.1},
    "pearson, KL 1": {"genes": "pearson_residuals"},
    "pearson, KL 0.25": {"genes": "pearson_residuals", "kl_weight": 0.25},
    "pearson, KL 0.1": {"genes": "pearson_residuals", "kl_weight": 0.1},
}


def configs() -> dict[str, tuple[dict, str, list[int]]]:
    """name -> (pipeline config, dataset, epochs to train). The workflow test's config is imported,
    not copied, so that these figures describe what the test runs."""
    from workflow_utils import CONFIG

    default = yaml.safe_load((HERE.parent / "config" / "demo.yaml").read_text())
    return {"default run": (default, "sim", [int(default["train"]["embedding"]["max_epochs"])]),
            "workflow test": (CONFIG, "sim5k", [8, 20, 30])}


def cluster_h5ad(out: Path, name: str, config: dict, dataset: str) -> Path:
    w = out / name.replace(" ", "_")
    path = w / "results" / dataset / "cluster.h5ad"
    if not path.exists():
        make_workdir(w, {**copy.deepcopy(config), "tracking": {"experiment": "cellatlas", "uri": None}})
        r = snakemake(w, "--cores", "all", f"results/{dataset}/cluster.h5ad")
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
    return path


def main() -> None:
    import anndata as ad
    import pandas as pd

    from cellatlas.config import SCHEMA, validate
    from cellatlas.deep.embedding import cluster_embedding, train_vae

    out = HERE / "out" / "vae_defaults"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (config, dataset, epochs_list) in configs().items():
        base = ad.read_h5ad(cluster_h5ad(out, name, config, dataset))
        # every key the job would get, the schema's defaults filled in as the workflow fills them
        config = validate(copy.deepcopy(config), SCHEMA)
        embedding = {k: v for k, v in config["train"]["embedding"].items() if k != "datasets"}
        embed, cluster = config["embed"], config["cluster"]
        for epochs in epochs_list:
            for variant, overrides in VARIANTS.items():
                a = base.copy()
                t0 = time.perf_counter()
                result = train_vae(a, dataset=dataset, model={**embedding, **overrides, "max_epochs": epochs},
                                   trainer={"accelerator": "cpu", "deterministic": True}, seed=0)
                seconds = time.perf_counter() - t0
                table, mixing = cluster_embedding(a, n_neighbors=embed["n_neighbors"], resolutions=cluster["resolutions"],
                                                  umap_min_dist=embed["umap_min_dist"])
                rows.append({"run": name, "dataset": dataset, "max_epochs": epochs, "variant": variant,
                             "epochs": result.epochs, "best_ari_vae": table["ari_vae"].max(),
                             "best_ari_pca": table["ari_pca"].max(), **mixing, "train_seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
                pd.DataFrame(rows).to_csv(out / "results.tsv", sep="\t", index=False)  # a long run keeps what it measured
    table = pd.DataFrame(rows)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, CPU")
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
