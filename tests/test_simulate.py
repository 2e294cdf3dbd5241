import numpy as np
import pytest

from cellatlas.simulate import simulate_counts


def test_shape_types_and_integer_counts(sim_counts):
    a = sim_counts
    assert a.shape == (600, 400)
    assert a.obs["cell_type"].nunique() == 3
    assert set(a.obs["donor"].unique()) <= {f"donor_{i}" for i in range(4)}
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0
    assert a.var_names.str.startswith("MT-").sum() == 13


def test_same_seed_same_counts_other_seed_other_counts():
    a = simulate_counts(n_cells=200, n_genes=200, seed=5)
    b = simulate_counts(n_cells=200, n_genes=200, seed=5)
    c = simulate_counts(n_cells=200, n_genes=200, seed=6)
    assert (a.X != b.X).nnz == 0
    assert (a.X != c.X).nnz > 0


def test_donors_nested_in_batches():
    a = simulate_counts(n_cells=500, n_genes=200, n_donors=6, n_batches=3, seed=0)
    assert (a.obs.groupby("donor", observed=True)["batch"].nunique() == 1).all()


def test_doublets_have_more_counts():
    a = simulate_counts(n_cells=2000, n_genes=300, doublet_rate=0.1, seed=0)
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    dbl = a.obs["is_doublet"].to_numpy()
    assert dbl.sum() == 200
    assert np.median(totals[dbl]) > 1.5 * np.median(totals[~dbl])


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="n_batches"):
        simulate_counts(n_cells=10, n_genes=200, n_donors=1, n_batches=2)


def test_written_block_by_block_equals_the_simulation_in_memory(tmp_path):
    """The scale benchmark's inputs are streamed to disk: the same cells, counts and annotation."""
    import anndata as ad

    from cellatlas.simulate import simulate_counts, write_simulated

    kw = dict(n_cells=1500, n_genes=2500, n_types=4, n_donors=4, n_batches=2, doublet_rate=0.05, program_genes=10,
              seed=3)  # 800 cells per block: two blocks and a part
    write_simulated(str(tmp_path / "sim.h5ad"), **kw)
    written, held = ad.read_h5ad(tmp_path / "sim.h5ad"), simulate_counts(**kw)
    assert written.shape == held.shape and (written.X != held.X).nnz == 0
    assert written.obs.equals(held.obs) and list(written.var_names) == list(held.var_names)
    assert written.uns["simulation"]["seed"] == 3
