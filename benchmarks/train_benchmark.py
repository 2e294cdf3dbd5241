"""Training throughput of the Lightning models: the fast data path against a naive per-cell DataLoader.

    python benchmarks/train_benchmark.py                       # 100,000 simulated cells x 2,000 genes
    python benchmarks/train_benchmark.py --cells 20000 --epochs 2
    python benchmarks/train_benchmark.py --precision bf16-mixed  # on a GPU

For each model (MLP classifier on log-normalized values, NB-VAE on counts) and each data path it
trains ``--epochs`` epochs in a fresh process (so peak memory is that configuration's own) and
reports cells per second per epoch (the first epoch, which warms up, excluded when there are
more), the loader alone (batches built and moved to the device, no model), peak RSS and peak
accelerator memory. The fast path is the pipeline's: batches gathered in bulk from CSR tensors,
on the accelerator when the matrix fits. The naive path is the usual ``Dataset`` whose
``__getitem__`` slices one sparse row, with a default ``DataLoader`` (``--workers`` processes).
Writes benchmarks/out/train_<cells>/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))


def make_data(out: Path, cells: int, genes: int) -> Path:
    path = out / "data.npz"
    if path.exists():
        return path
    import numpy as np
    import scipy.sparse as sp
    from cellatlas.simulate import simulate_counts

    a = simulate_counts(n_cells=cells, n_genes=genes, n_types=10, n_donors=20, n_batches=4, seed=0)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    lib = np.asarray(X.sum(axis=1)).ravel()
    logn = sp.diags((1e4 / np.maximum(lib, 1)).astype(np.float32)) @ X
    logn.data = np.log1p(logn.data)
    np.savez(path, counts_data=X.data, counts_indices=X.indices, counts_indptr=X.indptr,
             lognorm_data=logn.data.astype(np.float32), shape=np.array(X.shape),
             labels=np.unique(a.obs["cell_type"].astype(str), return_inverse=True)[1])
    return path


def load(path: Path, which: str):
    import numpy as np
    import scipy.sparse as sp

    z = np.load(path)
    data = z["counts_data"] if which == "counts" else z["lognorm_data"]
    return sp.csr_matrix((data, z["counts_indices"], z["counts_indptr"]), shape=tuple(z["shape"])), z["labels"]


def naive_dataset(X, y):
    """The baseline: the usual per-cell ``Dataset`` (built here, so torch is imported only when run)."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    class NaiveCellDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.X = sp.csr_matrix(X, dtype=np.float32)

        def __len__(self) -> int:
            return self.X.shape[0]

        def __getitem__(self, i: int):
            x = torch.from_numpy(self.X[i].toarray().ravel())
            label = torch.tensor(y[i] if y is not None else 0, dtype=torch.long)
            return x, label, torch.empty(0, dtype=torch.long)

    return NaiveCellDataset()


def run_one(args) -> dict:
    """One configuration, in this process."""
    import lightning.pytorch as L
    import numpy as np
    import torch
    from cellatlas.deep.data import CellDataModule
    from cellatlas.deep.plans import ClassifierPlan, VAEPlan
    from cellatlas.deep.training import TrainerSettings, fit, seed

    X, y = load(Path(args.data), "counts" if args.model == "vae" else "lognorm")
    seed(0)
    if args.model == "mlp":
        plan = ClassifierPlan(n_genes=X.shape[1], n_classes=int(y.max()) + 1, hidden=(256, 128))
    else:
        plan = VAEPlan(n_genes=X.shape[1], n_latent=10, hidden=128)
    labels = y if args.model == "mlp" else None

    class Naive(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.val_rows = []  # no validation: the epoch is training only, as in the fast path

        def train_dataloader(self):
            return torch.utils.data.DataLoader(naive_dataset(X, labels), batch_size=args.batch_size, shuffle=True,
                                               num_workers=args.workers, persistent_workers=args.workers > 0)

        def val_dataloader(self):
            return []

    if args.path == "fast":
        data = CellDataModule(X, y=labels, val_fraction=0.0, batch_size=args.batch_size, on_device="auto")
    else:
        data = Naive()
    settings = TrainerSettings(max_epochs=args.epochs, patience=args.epochs + 1, precision=args.precision,
                               deterministic=False, threads=args.threads)
    result = fit(plan, data, settings)
    seconds = [r["seconds"] for r in result.history]
    steady = seconds[1:] if len(seconds) > 1 else seconds
    epoch_s = float(np.median(steady))

    # the loader alone: every batch of one epoch built and on the training device
    device = torch.device(result.device)
    loader = data.train_dataloader()
    t = time.perf_counter()
    n = 0
    for x, *_ in loader:
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    loader_s = time.perf_counter() - t
    out = {
        "model": args.model, "path": args.path, "workers": args.workers if args.path == "naive" else None,
        "device": result.device, "precision": result.precision, "batch_size": args.batch_size,
        "epochs": len(seconds), "epoch_seconds": [round(s, 3) for s in seconds],
        "cells_per_second": round(X.shape[0] / epoch_s), "loader_cells_per_second": round(n / loader_s),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "matrix_on_device": bool(getattr(data, "device", torch.device("cpu")).type != "cpu"),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, nargs="*", default=[0], help="DataLoader workers of the naive path")
    ap.add_argument("--models", nargs="*", default=["mlp", "vae"])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.workers = args.workers[0]
        Path(args.out).write_text(json.dumps(run_one(args)))
        return

    out = HERE / "out" / f"train_{args.cells}"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data = make_data(out, args.cells, args.genes)
    print(f"data: {time.perf_counter() - t:.1f} s", flush=True)
    import torch

    rows = []
    configs = [(m, "fast", 0) for m in args.models] + [(m, "naive", w) for m in args.models for w in args.workers]
    for model, path, workers in configs:
        res = out / f"{model}_{path}_{workers}.json"
        cmd = [sys.executable, __file__, "--one", "--model", model, "--path", path, "--data", str(data), "--out", str(res),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--precision", args.precision,
               "--workers", str(workers)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, check=True)
        rows.append(json.loads(res.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    for model in args.models:
        fast = next(r for r in rows if r["model"] == model and r["path"] == "fast")
        for r in rows:
            if r["model"] == model and r["path"] == "naive":
                r["fast_speedup"] = round(fast["cells_per_second"] / r["cells_per_second"], 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
                   + (f", {gpu}" if gpu else ", no GPU") + f", torch {torch.__version__}",
        "cells": args.cells, "genes": args.genes, "runs": rows,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
