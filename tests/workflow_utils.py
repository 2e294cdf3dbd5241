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


def snakemake(workdir: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CELLATLAS_"))}
    # one numba cache for every run of the session, as a user's repeated runs would have
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".snakemake" / "numba-cache"))
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
