import numpy as np
import pytest
import scipy.sparse as sp

from cellatlas import keys
from cellatlas.cluster import cluster
from cellatlas.embed import embed, pca
from cellatlas.normalize import normalize
from cellatlas.qc import run_qc


@pytest.fixture
def normalized(canonical):
    a = run_qc(canonical, "sim", mode="fixed", fixed={"min_genes": 0}, doublets=False).adata
    normalize(a, "sim", n_top_genes=200)
    return a


def test_normalize_keeps_counts_and_logs(normalized):
    counts = normalized.layers[keys.COUNTS_LAYER]
    assert np.all(counts.data == np.round(counts.data))
    totals = np.expm1(normalized.X).sum(axis=1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert normalized.var["highly_variable"].sum() == 200
    assert "highly_variable_nbatches" in normalized.var  # batch-aware: the dataset has batches


def test_lognorm_input_is_not_normalized_twice(canonical):
    a = canonical.copy()
    a.X.data = np.log1p(a.X.data) + 0.1
    a.uns[keys.UNS_KEY]["ingest"]["values"] = keys.VALUES_LOGNORM
    before = a.X.copy()
    summary = normalize(a, "sim", n_top_genes=100)
    assert (a.X != before).nnz == 0 and keys.COUNTS_LAYER not in a.layers
    assert summary["normalization"].startswith("none")


def test_sparse_pca_equals_dense_zscore_pca(normalized):
    from sklearn.decomposition import PCA

    pca(normalized, n_pcs=10)
    hv = normalized.var["highly_variable"].to_numpy()
    dense = normalized.X[:, hv].toarray().astype(np.float64)
    z = (dense - dense.mean(0)) / dense.std(0)
    ref = PCA(10, svd_solver="full").fit_transform(z)
    ours = normalized.obsm["X_pca"]
    for k in range(10):  # same components up to sign
        assert abs(np.corrcoef(ref[:, k], ours[:, k])[0, 1]) > 0.999
    assert sp.issparse(normalized.X)  # the gene matrix itself stays sparse
    assert (normalized.varm["PCs"][~hv] == 0).all()


def test_embed_and_cluster_recover_simulated_types(normalized):
    summary = embed(normalized, n_pcs=20, seed=0)
    assert normalized.obsm["X_umap"].shape == (normalized.n_obs, 2)
    assert normalized.obsm["X_tsne"].shape == (normalized.n_obs, 2)
    assert 0 < summary["pca_variance_explained"] <= 1
    table, markers, s = cluster(normalized, resolutions=[0.3, 1.0], marker_resolution=0.3, marker_n_genes=5)
    assert s["best_ari"] > 0.9, table
    assert set(table["resolution"]) == {0.3, 1.0}
    assert (markers.groupby("cluster")["rank"].max() == 5).all()


def test_umap_starts_from_the_top_two_components_of_the_graphs_representation():
    import anndata as ad
    from sklearn.decomposition import PCA

    from cellatlas.embed import umap_start

    rng = np.random.default_rng(0)
    rep = rng.normal(size=(500, 8)) * np.array([1, 6, 1, 3, 1, 1, 1, 1]) + 5.0
    a = ad.AnnData(obs={"i": np.arange(500).astype(str)}, obsm={"X_vae": rep, "X_pca": rng.normal(size=(500, 4))})
    a.uns["neighbors"] = {"params": {"use_rep": "X_vae"}}
    start = umap_start(a)
    ref = PCA(2, svd_solver="full").fit_transform(rep)
    for k in range(2):  # the representation the graph was built on, not X_pca
        assert abs(np.corrcoef(ref[:, k], start[:, k])[0, 1]) > 0.9999
    # signs fixed by the loadings (the largest is positive), not left to the eigensolver
    top = np.linalg.lstsq(rep - rep.mean(0), start.astype(np.float64), rcond=None)[0]
    assert (top[np.abs(top).argmax(axis=0), [0, 1]] > 0).all()
    a.obsm["X_vae"] = rep[:, :1]
    assert umap_start(a) == "spectral"


def test_same_seed_same_embedding_and_clusters(normalized):
    a, b = normalized.copy(), normalized.copy()
    for x in (a, b):
        embed(x, n_pcs=20, seed=1)
        cluster(x, resolutions=[1.0], marker_resolution=1.0, marker_n_genes=3)
    np.testing.assert_array_equal(a.obsm["X_umap"], b.obsm["X_umap"])
    np.testing.assert_array_equal(a.obsm["X_tsne"], b.obsm["X_tsne"])
    assert (a.obs[keys.leiden_key(1.0)] == b.obs[keys.leiden_key(1.0)]).all()


def test_cluster_without_labels_reports_nan(normalized):
    del normalized.obs[keys.LABEL]
    embed(normalized, n_pcs=10)
    table, _, summary = cluster(normalized, resolutions=[1.0], marker_resolution=1.0)
    assert np.isnan(table.loc[0, "ari"]) and "best_ari" not in summary


def test_cluster_legends_count_in_numeric_order():
    import pandas as pd

    from cellatlas.plotting import legend_order

    # cluster numbers come back from an h5ad as strings; the legend must not read 0, 1, 10, 11, 2
    as_text = pd.Series([str(i) for i in (2, 10, 0, 11, 1)], dtype=object)
    assert list(legend_order(as_text).categories) == ["0", "1", "2", "10", "11"]
    assert list(legend_order(as_text.astype("category")).categories) == ["0", "1", "2", "10", "11"]
    labels = pd.Series(["T", "B", None], dtype=object).astype("category")
    assert list(legend_order(labels).categories) == ["B", "T", "(none)"]


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.8, 0.2)])
@pytest.mark.parametrize("transformer", [None, "pynndescent"])
def test_batch_mixing_is_one_for_mixed_batches_and_zero_for_separated(shares, transformer):
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    from cellatlas.cluster import batch_mixing

    rng = np.random.default_rng(0)
    n = 1000
    batch = pd.Categorical(rng.choice(["b0", "b1"], size=n, p=shares))
    points = rng.normal(size=(n, 5)).astype(np.float32)

    def mixing(z):
        a = ad.AnnData(obs=pd.DataFrame({keys.BATCH: batch}, index=[f"c{i}" for i in range(n)]), obsm={"z": z})
        # PyNNDescent (scanpy's choice from 8,192 cells) keeps each cell as its own neighbour
        sc.pp.neighbors(a, n_neighbors=15, use_rep="z", random_state=0, transformer=transformer)
        return batch_mixing(a)

    # the batch drawn independently of where a cell lies: as mixed as random neighbours
    assert mixing(points) == pytest.approx(1.0, abs=0.05)
    # each batch shifted far from the other: no neighbour across
    shifted = points + 100 * (batch.codes[:, None] == 1)
    assert mixing(shifted.astype(np.float32)) == pytest.approx(0.0, abs=1e-9)
    # half the batch effect: in between
    assert 0.05 < mixing((points + 1.5 * (batch.codes[:, None] == 1)).astype(np.float32)) < 0.9


def test_cluster_reports_batch_mixing_only_with_batches(normalized):
    from cellatlas.cluster import batch_mixing

    embed(normalized, n_pcs=10)
    _, _, summary = cluster(normalized, resolutions=[1.0], marker_resolution=1.0, marker_n_genes=5)
    assert 0 < summary["batch_mixing"] == pytest.approx(batch_mixing(normalized))
    assert np.isnan(batch_mixing(normalized, key="no_such_column"))
    normalized.obs[keys.BATCH] = "one"
    assert np.isnan(batch_mixing(normalized))
    _, _, summary = cluster(normalized, resolutions=[1.0], marker_resolution=1.0, marker_n_genes=5)
    assert "batch_mixing" not in summary



def test_markers_are_scanpys_wilcoxon_result(normalized):
    import scanpy as sc

    from cellatlas.cluster import markers

    embed(normalized, n_pcs=10)
    cluster(normalized, resolutions=[1.0], marker_resolution=1.0, marker_n_genes=5)
    ours = markers(normalized, resolution=1.0, n_genes=30)
    assert normalized.uns["rank_genes_groups"]["params"]["method"] == "wilcoxon (illico)"
    sc.tl.rank_genes_groups(normalized, groupby=keys.leiden_key(1.0), method="wilcoxon", n_genes=30, use_raw=False)
    theirs = sc.get.rank_genes_groups_df(normalized, group=None)
    assert len(ours) == len(theirs) == 30 * normalized.obs[keys.leiden_key(1.0)].nunique()
    assert list(ours["gene"]) == list(theirs["names"])
    np.testing.assert_allclose(ours["score"], theirs["scores"], rtol=1e-5)
    np.testing.assert_allclose(ours["logfoldchange"], theirs["logfoldchanges"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["pval_adj"], theirs["pvals_adj"], rtol=1e-6, atol=1e-300)


def test_hvgs_are_scanpys_selection_on_the_whole_anndata(canonical):
    import scanpy as sc

    a = run_qc(canonical, "sim", mode="fixed", fixed={"min_genes": 0}, doublets=False).adata
    theirs = a.copy()
    normalize(a, "sim", n_top_genes=200)
    theirs.layers[keys.COUNTS_LAYER] = theirs.X.copy()
    sc.pp.normalize_total(theirs, target_sum=1e4)
    sc.pp.log1p(theirs)
    sc.pp.highly_variable_genes(theirs, n_top_genes=200, flavor="seurat", batch_key=keys.BATCH)
    for column in ("highly_variable", "means", "dispersions_norm", "highly_variable_nbatches"):
        np.testing.assert_array_equal(a.var[column], theirs.var[column])
    assert a.uns["hvg"] == theirs.uns["hvg"]


@pytest.mark.parametrize("target_sum", [1e4, None])
def test_blockwise_normalize_total_is_scanpys(normalized, target_sum):
    import anndata as ad
    import scanpy as sc

    from cellatlas.normalize import normalize_total

    counts = normalized.layers[keys.COUNTS_LAYER]
    ours, theirs = ad.AnnData(X=counts.copy()), ad.AnnData(X=counts.copy())
    normalize_total(ours, target_sum=target_sum, block=7)  # blocks that do not divide the cells
    sc.pp.normalize_total(theirs, target_sum=target_sum)
    np.testing.assert_array_equal(ours.X.data, theirs.X.data)
    np.testing.assert_array_equal(ours.X.indices, theirs.X.indices)


@pytest.mark.parametrize(("values", "varies"), [
    ([[1, 0], [1, 0], [1, 0]], False),   # every gene stored in every cell or in none, the same values
    ([[1, 0], [2, 0], [1, 0]], True),    # a value differs: found by the column min/max
    ([[1, 0], [0, 0], [1, 0]], True),    # stored in some cells only: zeros and nonzeros
    ([[1, 0], [1, 0], [1, 0], [1, 5]], True),
])
def test_a_varying_gene_is_found_in_slices(values, varies, monkeypatch):
    from cellatlas import normalize as module

    monkeypatch.setattr(module, "CHUNK", 2)  # slices shorter than the matrix's nonzeros
    X = sp.csr_matrix(np.asarray(values, dtype=np.float32))
    assert module._any_gene_varies(X) is varies
    # a stored zero is not a nonzero: the gene holds only zeros
    stored_zero = sp.csr_matrix((np.array([1, 1, 1, 0], np.float32), np.array([0, 0, 0, 1]), np.array([0, 1, 2, 4])),
                                shape=(3, 2))
    assert module._any_gene_varies(stored_zero) is False


def test_the_embed_stage_reads_only_the_hvg_columns_and_makes_the_same_maps(normalized, tmp_path):
    from cellatlas.chain import embed_stage

    path = tmp_path / "normalize.h5ad"
    normalized.write_h5ad(path)
    p = {"n_pcs": 20, "scale": True, "n_neighbors": 10, "umap_min_dist": 0.5, "tsne_perplexity": 30.0}
    staged = embed_stage(str(path), "sim", p, seed=1, threads=1).data["h5ad"]
    assert staged.adata.X is None and "X" in staged.carried  # X is copied into the output, not held
    expected = normalized.copy()
    embed(expected, n_pcs=20, n_neighbors=10, seed=1)
    for key in ("X_pca", "X_umap", "X_tsne"):
        np.testing.assert_array_equal(staged.adata.obsm[key], expected.obsm[key])
    assert (staged.adata.obsp["distances"] != expected.obsp["distances"]).nnz == 0
    np.testing.assert_array_equal(staged.adata.varm["PCs"], expected.varm["PCs"])
