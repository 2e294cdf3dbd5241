import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
SHARED_DATA = Path(os.environ.get("CELLATLAS_SHARED_DATA", ROOT.parent / "shared" / "data"))

# as in a job (cellatlas.runner): OpenMP threads sleep while they wait, since `make test` runs more
# processes than there are cores; set before any test imports torch or scikit-learn
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the JIT caches the pipeline's jobs use (cellatlas.runner), for the tests that run stages in this
# process too: umap/pynndescent's numba code and scib-metrics' jax code compile once per checkout
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".snakemake" / "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
from cellatlas._numba import enable_cache  # noqa: E402

enable_cache(str(ROOT / ".snakemake" / "numba-cache"))


#: the units of work that take longest (the tests of the session's shared workflow run, and two
#: files of workflow runs), started first when pytest-xdist spreads the suite (`make test`); the
#: other files follow in order, and the workers that finish first take them
LONGEST_FIRST = ("shared-run", "test_workflow.py", "test_slurm.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Units of work for ``--dist loadgroup``: a test file, except that every test of the shared
    workflow run (fixture ``workdir``, made once per worker) is one unit, whatever its file; the
    longest units first, so that they do not start late (xdist may still queue a unit behind a
    worker's last long test)."""
    if getattr(config.option, "dist", "no") != "loadgroup" and not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = "shared-run" if "workdir" in item.fixturenames else item.path.name
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item):
        mark = item.get_closest_marker("xdist_group")
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


def task_obs():
    """600 cells, 3 classes, 6 donors nested in 2 batches, a numeric 'program' (the classify tests' obs)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 600
    donor = rng.integers(0, 6, n)
    return pd.DataFrame(
        {
            "label": pd.Categorical(rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])),
            "donor": pd.Categorical([f"d{d}" for d in donor]),
            "batch": pd.Categorical([f"b{d % 2}" for d in donor]),
            "program": rng.normal(size=n),
        },
        index=[f"cell{i}" for i in range(n)],
    )


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


