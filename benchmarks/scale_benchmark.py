"""Atlas scale: the chain ingest -> qc -> normalize -> embed -> cluster, with tracking, on simulated
atlases of growing size; each stage's wall time and peak memory, and how they grow with cells.

    python benchmarks/scale_benchmark.py 100000 250000     # sizes to run now (cells)
    python benchmarks/scale_benchmark.py --report           # the table of every size run so far

Each size is its own Snakemake run (`--cores 2`, the default profile, MLflow on SQLite) on an
input simulated with 20,000 genes straight to disk (`cellatlas.simulate.write_simulated`). What
the inputs hold, and why:

* detected genes per cell: ``library_size`` 1,500 gives a median of about 1,180 (10x atlases
  have 800-1,500), which sets the nonzeros and so the memory: ~1.2 billion at a million cells;
* one donor (a 10x channel, a sample) per 10,000 cells, in 4 batches: samples stay the size of
  a capture as an atlas grows, which is what per-sample doublet scoring sees;
* 12 cell types, 3% doublets.

Per-stage seconds and peak RSS come from Snakemake's `benchmark:` files (the whole job process).
A stage that fails (memory, time) is recorded with the last lines of its log, and the sizes after
it still run. Results accumulate in benchmarks/out/scale/result.json; the report fits
log(seconds) and log(peak memory) against log(cells) per stage over the sizes that finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from run_benchmark import STAGES, chain_config  # noqa: E402
from workflow_utils import make_workdir, snakemake  # noqa: E402

OUT = HERE / "out" / "scale"
N_GENES = 20_000
CELLS_PER_DONOR = 10_000


def simulation(n_cells: int) -> dict:
    return {"n_cells": n_cells, "n_genes": N_GENES, "n_types": 12, "n_donors": max(2, n_cells // CELLS_PER_DONOR),
            "n_batches": 4, "library_size": 1500.0, "doublet_rate": 0.03, "seed": 0}


def prepare(params: dict, folder: Path) -> tuple[Path, float]:
    """The input h5ad of simulation ``params`` (made once, in its own process so its memory is
    not the pipeline's)."""
    path = folder / "input.h5ad"
    if path.exists():
        return path, 0.0
    code = ("import json, sys; from cellatlas.simulate import write_simulated; "
            "write_simulated(sys.argv[1] + '.part', **json.loads(sys.argv[2]))")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "workflow" / "scripts")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path), json.dumps(params)], check=True, env=env)
    os.replace(f"{path}.part", path)
    return path, time.perf_counter() - t


def job_figures(tsv: Path) -> dict:
    """Seconds and peak RSS of one job, from its Snakemake ``benchmark:`` file."""
    with open(tsv) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    return {"seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}


def stage_figures(workdir: Path, dataset: str) -> dict:
    tsvs = {stage: workdir / "results" / dataset / "benchmarks" / f"{stage}.tsv" for stage in STAGES}
    return {stage: job_figures(tsv) for stage, tsv in tsvs.items() if tsv.exists()}


def run_size(n_cells: int, keep: bool, earlier: dict | None = None) -> dict:
    """One size's run; with ``earlier`` (that size's saved result), the run that stopped is
    continued in its own folder: the stages it finished are not run again."""
    folder = OUT / str(n_cells)
    folder.mkdir(parents=True, exist_ok=True)
    workdir = folder / "pipeline"
    if earlier:
        if not (workdir / ".snakemake").is_dir():
            raise SystemExit(f"--continue: {workdir} has no stopped run to continue")
        nnz, simulate_seconds = earlier["nnz"], earlier["simulate_seconds"]
    else:
        h5ad, simulate_seconds = prepare(simulation(n_cells), folder)
        import anndata as ad

        backed = ad.read_h5ad(h5ad, backed="r")
        nnz = int(backed.X.group["indptr"][-1])
        backed.file.close()
        shutil.rmtree(workdir, ignore_errors=True)
        config = chain_config({"source": {"kind": "h5ad", "path": str(h5ad)}, "label_key": "cell_type",
                               "batch_key": "batch", "donor_key": "donor"}, "scale")
        # each stage file is a whole copy of the matrix (two for normalize and embed): a million cells'
        # would not fit this machine's disk together, so each goes once the next stage has read it
        make_workdir(workdir, {**config, "keep_intermediate": keep})
    t = time.perf_counter()
    r = snakemake(workdir, "--cores", "2", "--", "results/scale/cluster/run.json", timeout=6 * 3600)
    wall = time.perf_counter() - t
    stages = stage_figures(workdir, "scale")
    if earlier:  # the stopped run's stages that finished: their own seconds (it may have no wall time)
        wall += sum(s["seconds"] for s in earlier["stages"].values())
    result = {"n_cells": n_cells, "n_genes": N_GENES, "nnz": nnz, "simulation": simulation(n_cells),
              "simulate_seconds": simulate_seconds and round(simulate_seconds, 1), "wall_seconds": round(wall, 1),
              "completed": r.returncode == 0, "stages": stages}
    if earlier:
        result["continued"] = sorted(earlier["stages"])
    if r.returncode != 0:
        failed = [s for s in STAGES if s not in result["stages"]]
        log = workdir / "results" / "scale" / "logs" / f"{failed[0]}.log" if failed else None
        result["failed_stage"] = failed[0] if failed else None
        result["failure"] = ((log.read_text()[-1500:] if log and log.exists() else "") + "\n" + r.stderr[-1500:])
    (folder / "snakemake.log").write_text(r.stdout + r.stderr)
    if not keep and r.returncode == 0:  # cluster.h5ad too; logs and tables stay (a stopped run's can continue)
        for h5ad in (workdir / "results").rglob("*.h5ad"):
            h5ad.unlink()
        shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
    return result


def fit(results: list[dict], stage: str, key: str, size: str = "n_cells") -> float | None:
    """Slope of log(cost) against log(size): ``size`` is cells or nonzeros (the inputs' nonzeros per
    cell differ between sizes, see the module's note)."""
    points = [(r[size], r["stages"][stage][key]) for r in results if stage in r["stages"]]
    if len(points) < 2:
        return None
    n, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(n, y, 1)[0])


def report(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: r["n_cells"])
    lines = ["| stage | " + " | ".join(f"{r['n_cells']:,} cells" for r in results) + " | exponent (time) | "
             "exponent (memory) | per nonzero (time) |", "|---|" + "---:|" * (len(results) + 3)]
    for stage in STAGES:
        cells = []
        for r in results:
            s = r["stages"].get(stage)
            cells.append(f"{s['seconds']:,.0f} s, {s['max_rss_mb'] / 1024:.1f} GiB" if s else
                         ("**failed**" if r.get("failed_stage") == stage else "-"))
        slopes = [fit(results, stage, key) for key in ("seconds", "max_rss_mb")] + [fit(results, stage, "seconds", "nnz")]
        lines.append(f"| {stage} | " + " | ".join(cells + ["-" if e is None else f"{e:.2f}" for e in slopes]) + " |")
    lines.append("| whole chain (wall) | " + " | ".join(
        f"{r['wall_seconds']:,.0f} s" + ("" if r["completed"] else " (stopped)") for r in results) + " | | | |")
    lines.append("| nonzeros | " + " | ".join(f"{r['nnz'] / 1e6:,.0f} M" for r in results) + " | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sizes", nargs="*", type=int)
    parser.add_argument("--keep", action="store_true", help="keep each size's stage files (several copies of the matrix)")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="continue each size's stopped run in its folder (its stage files must still be there)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "result.json"
    saved = json.loads(store.read_text()) if store.exists() else {"runs": {}}
    saved["machine"] = (f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                        f"Python {platform.python_version()}")
    for n in args.sizes:
        earlier = saved["runs"].get(str(n)) if args.resume else None
        if args.resume and earlier is None:
            raise SystemExit(f"--continue: no saved run of {n:,} cells in {store}")
        result = run_size(n, args.keep, earlier)
        saved["runs"][str(n)] = result
        store.write_text(json.dumps(saved, indent=2))
        print(f"{n:,} cells: {'completed' if result['completed'] else 'stopped in ' + str(result['failed_stage'])} "
              f"in {result['wall_seconds']:,.0f} s", flush=True)
    print(report(list(saved["runs"].values())))


if __name__ == "__main__":
    main()
