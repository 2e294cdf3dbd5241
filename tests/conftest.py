import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
SHARED_DATA = Path(os.environ.get("CELLATLAS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def sim_counts():
    """A small simulated counts AnnData (600 cells, 3 types, 4 donors in 2 batches)."""
    from cellatlas.simulate import simulate_counts

    return simulate_counts(n_cells=600, n_genes=400, n_types=3, n_donors=4, n_batches=2, seed=3)


@pytest.fixture
def canonical(sim_counts):
    from cellatlas.ingest import canonicalize

    return canonicalize(sim_counts, "sim", label_key="cell_type", batch_key="batch", donor_key="donor")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One real run of the workflow (workflow_utils.CONFIG), shared by the tests that check it."""
    from workflow_utils import CONFIG, make_workdir, snakemake

    w = make_workdir(tmp_path_factory.mktemp("wf"), CONFIG)
    r = snakemake(w, "--cores", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    (w / "snakemake.out").write_text(r.stdout + r.stderr)
    return w
