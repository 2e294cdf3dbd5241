"""Run the real workflow in a scratch copy of the project (shared by tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("Snakefile", "workflow", "config/schema", "profiles", "envs")


def make_workdir(path: Path, config: dict) -> Path:
    """A copy of the workflow with ``config`` as its config/config.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        src, dst = ROOT / part, path / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    write_config(path, config)
    return path


def write_config(path: Path, config: dict) -> None:
    (path / "config").mkdir(exist_ok=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake_command(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``snakemake *args`` and its environment: this one less its MLflow and pipeline settings, plus ``env``."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CELLATLAS_"))}, **(env or {})}
    # one numba cache for every run of the session, as a user's repeated runs would have
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".snakemake" / "numba-cache"))
    return [sys.executable, "-m", "snakemake", *args], env


#: a run's limit: `make test` runs other tests beside it on the same cores, which took the shared
#: run from about 10 to more than 20 minutes (it only stops a run that hangs)
TIMEOUT = 3600


def snakemake(workdir: Path, *args: str, timeout: float = TIMEOUT, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    cmd, env = snakemake_command(*args, env=env)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


#: the workflow tests' config: every stage on small data (the session's shared run, conftest.workdir)
CONFIG = {
    "datasets": {
        "pbmc68k": {
            "source": {"kind": "scanpy", "name": "pbmc68k_reduced"},
            "matrix": "raw",
            "values": "lognorm",
            "label_key": "bulk_labels",
        },
        # 5,200 cells: more than the others, though scanpy keeps its exact kNN graph up to 8,192 (euclidean)
        "sim5k": {
            "source": {"kind": "simulate", "n_cells": 5200, "n_genes": 1500, "n_types": 5, "n_donors": 4,
                       "n_batches": 2, "doublet_rate": 0.03, "batch_sd": 0.05, "donor_sd": 0.05, "program_genes": 20,
                       "seed": 7},
            "label_key": "cell_type",
            "batch_key": "batch",
            "donor_key": "donor",
        },
    },
    "cluster": {"resolutions": [0.5, 1.0], "marker_resolution": 0.5, "marker_method": "t-test"},
    "classify": {
        "tasks": {"sim5k": {"cell_type": {"target": "label"}, "program": {"target": "program", "kind": "regression"}}},
        "features": {"n_genes": 500, "n_pcs": 20},
        "classifiers": {"logistic_regression": {"kind": "logistic_regression"}, "knn": {"kind": "knn", "input": "pca"},
                        "mlp": {"kind": "mlp", "params": {"hidden": [64], "max_epochs": 6}}},
        "regressors": {"ridge": {"kind": "ridge"}},
    },
    "train": {"embedding": {"datasets": ["sim5k"], "n_latent": 8, "max_epochs": 8}},
    # sim5k's two batches integrated (its one-donor query has one batch); the cluster stage uses the best
    "integration": {"datasets": ["sim5k"], "methods": ["harmony", "bbknn", "vae", "vae_labels"]},
    # sim5k is the reference; the query is one of its donors again, read as a dataset of its own
    # (cells the reference holds: every method must label them as the reference does)
    "atlas": {"atlases": {"a": {"reference": "sim5k", "queries": ["sim5k_q"]}}},
}
CONFIG["datasets"]["sim5k_q"] = {**CONFIG["datasets"]["sim5k"], "subset": {"keep": {"donor": ["donor_3"]}}}


def child_commands(pid: int) -> list[str]:
    """The command lines of a process's descendants (a child that ends while we look is skipped)."""
    import psutil

    lines = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            lines.append(" ".join(child.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return lines


#: pbmc68k_reduced's bulk_labels (from correlation with sorted populations) -> PBMC 3k's Seurat labels
#: that count as right: lenient where a sorted population spans two of PBMC 3k's types (CD4 T
#: subsets, monocytes; dendritic cells, a loose label there, also on monocytes); CD34+ progenitors
#: have no PBMC 3k counterpart
PBMC68K_TO_PBMC3K = {
    "CD14+ Monocyte": ["CD14+ Mono", "FCGR3A+ Mono"],
    "CD19+ B": ["B"],
    "CD34+": [],
    "CD4+/CD25 T Reg": ["Naive CD4 T", "Memory CD4 T"],
    "CD4+/CD45RA+/CD25- Naive T": ["Naive CD4 T", "Memory CD4 T"],
    "CD4+/CD45RO+ Memory": ["Naive CD4 T", "Memory CD4 T"],
    "CD56+ NK": ["NK"],
    "CD8+ Cytotoxic T": ["CD8 T"],
    "CD8+/CD45RA+ Naive Cytotoxic": ["CD8 T"],
    "Dendritic": ["DC", "CD14+ Mono", "FCGR3A+ Mono"],
}
