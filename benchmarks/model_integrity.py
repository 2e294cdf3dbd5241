"""What the model checks cost: logging (skops vs cloudpickle, with the digest read back) and loading
(checked with cellatlas.modelstore.load_model vs MLflow's unchecked load), per model kind.

    python benchmarks/model_integrity.py                 # 5,000 cells x 2,000 genes, 3 repeats
    python benchmarks/model_integrity.py --cells 20000

The models are the classify stage's final models (the same pipelines: gene selection, then the
estimator) fitted on simulated counts; the store is a local SQLite one, as the default run's. Each
figure is the median of the repeats, in seconds; sizes are the logged model's files. Writes
benchmarks/out/model_integrity_<cells>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))

KINDS = ("logistic_regression", "random_forest", "knn")


def _model(kind: str, X, y):
    """The classify stage's pipeline for ``kind`` with its default settings (kNN on 50 PCs)."""
    from cellatlas.classify.features import build_pipeline
    from cellatlas.classify.models import make_estimator

    estimator = make_estimator(kind, "classification")
    return build_pipeline(estimator, task="classification", input="pca" if kind == "knn" else "genes",
                          n_genes=500).fit(X, y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from cellatlas import modelstore, tracking
    from cellatlas.ingest import canonicalize
    from cellatlas.normalize import normalize
    from cellatlas.simulate import simulate_counts
    from cellatlas.stage import Model

    adata = canonicalize(simulate_counts(n_cells=args.cells, n_genes=args.genes, seed=0), "bench",
                         label_key="cell_type")
    normalize(adata, "bench")
    X, y = adata.X, adata.obs["label"].astype(str).to_numpy()
    folder = Path(tempfile.mkdtemp(prefix="cellatlas-integrity-"))
    os.environ[tracking.ENV_URI] = uri = f"sqlite:///{folder / 'mlflow.db'}"
    rows = []
    for kind in KINDS:
        model = Model(_model(kind, X, y), flavor="sklearn", input_example=X[:2].toarray())
        for fmt in ("skops", "cloudpickle"):
            times = {"log": [], "digest": [], "load_checked": [], "load_unchecked": []}
            for r in range(args.repeats):
                record = folder / f"{kind}-{fmt}-{r}.json"
                original = modelstore.skops_types
                if fmt == "cloudpickle":
                    modelstore.skops_types = lambda obj: None
                try:
                    with tracking.stage_run("classify", "bench", params={}, record=record) as run:
                        t0 = time.perf_counter()
                        model_uri = run.log_model(model, name=f"bench-{kind}")  # the digest included
                        times["log"].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        run._record_model_digest(model_uri)  # the same step again, alone
                        times["digest"].append(time.perf_counter() - t0)
                finally:
                    modelstore.skops_types = original
                t0 = time.perf_counter()
                modelstore.load_model(model_uri, tracking_uri=uri)
                times["load_checked"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                mlflow.set_tracking_uri(uri)
                mlflow.pyfunc.load_model(model_uri)
                times["load_unchecked"].append(time.perf_counter() - t0)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder / "dl")))
            size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
            row = {"model": kind, "format": fmt, "size_mb": round(size / 1e6, 2),
                   **{k: round(statistics.median(v), 3) for k, v in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = HERE / "out" / f"model_integrity_{args.cells}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cells": args.cells, "genes": args.genes, "repeats": args.repeats,
                               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
