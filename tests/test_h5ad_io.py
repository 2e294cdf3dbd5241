import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas import h5ad_io, keys


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    counts = sp.random(50, 30, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.round(counts.data * 10) + 1
    a = ad.AnnData(X=counts.copy(), layers={keys.COUNTS_LAYER: counts})
    a.X.data = np.log1p(a.X.data)
    a.obs["label"] = rng.choice(["a", "b"], 50)
    a.uns["stage"] = {"k": 1}
    path = tmp_path / "in.h5ad"
    a.write_h5ad(path)
    return path, a


def test_read_leaves_the_layers_on_disk(stored):
    path, a = stored
    data = h5ad_io.read(str(path))
    assert keys.COUNTS_LAYER not in data.adata.layers
    assert (data.adata.X != a.X).nnz == 0 and data.adata.obs_names.equals(a.obs_names)
    assert data.adata.uns["stage"]["k"] == 1


def test_write_carries_the_left_out_elements_and_replaces_the_rest(stored, tmp_path):
    path, a = stored
    data = h5ad_io.read(str(path), without=("layers",), unchanged=("X",))
    data.adata.obsm["X_new"] = np.arange(100, dtype=np.float32).reshape(50, 2)
    data.adata.obs["cluster"] = "0"
    out = tmp_path / "out.h5ad"
    h5ad_io.write(data, str(out))
    back = ad.read_h5ad(out)
    assert (back.layers[keys.COUNTS_LAYER] != a.layers[keys.COUNTS_LAYER]).nnz == 0
    assert (back.X != a.X).nnz == 0
    np.testing.assert_array_equal(back.obsm["X_new"], data.adata.obsm["X_new"])
    assert list(back.obs.columns) == ["label", "cluster"]



def test_an_unchanged_x_is_copied_from_the_input_not_written_from_memory(stored, tmp_path):
    path, a = stored
    data = h5ad_io.read(str(path), unchanged=("X",))
    data.adata.X = data.adata.X * 0  # what the stage holds is not what is written
    out = tmp_path / "out.h5ad"
    h5ad_io.write(data, str(out))
    assert (ad.read_h5ad(out).X != a.X).nnz == 0


def test_x_left_out_is_carried_without_being_read(stored, tmp_path):
    path, a = stored
    data = h5ad_io.read(str(path), without=("X", "layers"))
    assert data.adata.X is None and data.adata.shape == a.shape
    out = tmp_path / "out.h5ad"
    h5ad_io.write(data, str(out))
    assert (ad.read_h5ad(out).X != a.X).nnz == 0


def test_only_matrices_can_be_left_out(stored):
    with pytest.raises(ValueError, match="obs"):
        h5ad_io.read(str(stored[0]), without=("obs",))


def test_an_input_element_becomes_a_layer_of_the_output(stored, tmp_path):
    path, a = stored
    data = h5ad_io.read(str(path), layers_from={"raw_x": "X"})
    data.adata.X = data.adata.X * 2  # the stage changes X in memory; the output keeps the input's too
    out = tmp_path / "out.h5ad"
    h5ad_io.write(data, str(out))
    back = ad.read_h5ad(out)
    assert (back.layers["raw_x"] != a.X).nnz == 0 and (back.X != a.X * 2).nnz == 0
    assert set(back.layers) == {"raw_x", keys.COUNTS_LAYER}


def test_raw_is_written_back_and_layers_from_needs_no_layers_group(tmp_path):
    a = ad.AnnData(X=sp.random(20, 5, density=0.5, format="csr", random_state=0, dtype=np.float32))
    a.raw = a.copy()
    path = tmp_path / "in.h5ad"
    a.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    h5ad_io.write(h5ad_io.read(str(path), without=(), layers_from={"copy": "X"}), str(out))
    back = ad.read_h5ad(out)
    assert (back.raw.X != a.X).nnz == 0 and (back.layers["copy"] != a.X).nnz == 0


@pytest.mark.parametrize("dense", [False, True])
def test_columns_of_x_are_read_block_by_block(stored, tmp_path, dense):
    path, a = stored
    if dense:  # a dense X is read whole, then its columns taken
        a = a.copy()
        a.X = a.X.toarray()
        path = tmp_path / "dense.h5ad"
        a.write_h5ad(path)
    columns = np.random.default_rng(1).random(a.n_vars) < 0.4
    got = h5ad_io.read_columns(str(path), "X", columns, block=7)  # several blocks, the last one short
    expected = sp.csr_matrix(a.X)[:, columns]
    assert sp.issparse(got) and got.format == "csr" and got.shape == (a.n_obs, columns.sum())
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)
