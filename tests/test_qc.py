import numpy as np
import pandas as pd
import pytest

from cellatlas import keys
from cellatlas.qc import mad_bounds, run_qc, thresholds


def test_mad_bounds():
    x = np.array([1, 2, 3, 4, 100], dtype=float)  # median 3, MAD 1
    assert mad_bounds(x, 2) == (1.0, 5.0)
    lo, hi = mad_bounds(x, 2, lower=False)
    assert lo == -np.inf and hi == 5.0


def test_fixed_thresholds_count_cells_outside():
    obs = pd.DataFrame({"n_genes_by_counts": [100, 300, 900], "total_counts": [500, 800, 5000], "pct_counts_mt": [1, 30, 2]})
    t = thresholds(obs, mode="fixed", fixed={"min_genes": 200, "max_pct_mt": 20}, nmads=5, nmads_mt=3, counts=True).set_index("metric")
    assert t.loc["n_genes_by_counts", "n_outside"] == 1
    assert t.loc["pct_counts_mt", "n_outside"] == 1
    assert t.loc["total_counts", "n_outside"] == 0


def test_mad_mode_removes_outliers_and_scores_doublets(canonical):
    a = canonical.copy()
    X = a.X.tolil()
    X[0, :] = 0  # an empty droplet
    X[0, 20:25] = 1
    a.X = X.tocsr()
    res = run_qc(a, "sim", mode="mad", nmads=3, doublets=True)
    assert a.obs_names[0] not in res.adata.obs_names
    assert not res.cells.loc[a.obs_names[0], "passed_qc"]
    assert res.summary["cells_in"] == 600 and res.summary["cells_kept"] == res.adata.n_obs < 600
    assert "doublet_score" in res.adata.obs and "doublets_predicted" in res.summary
    assert res.adata.uns[keys.UNS_KEY]["qc"]["params"]["mode"] == "mad"


def test_remove_doublets(canonical):
    res = run_qc(canonical.copy(), "sim", mode="fixed", fixed={"min_genes": 0}, doublets=True, remove_doublets=True)
    assert not res.adata.obs["predicted_doublet"].any()


def test_lognorm_input_skips_count_based_qc(canonical):
    a = canonical.copy()
    a.X.data = np.log1p(a.X.data) + 0.1
    a.uns[keys.UNS_KEY]["ingest"]["values"] = keys.VALUES_LOGNORM
    res = run_qc(a, "sim", mode="fixed", fixed={"min_genes": 0, "max_pct_mt": 1}, doublets=True)
    assert list(res.thresholds["metric"]) == ["n_genes_by_counts"]
    assert res.adata.n_obs == 600 and "doublet_score" not in res.adata.obs
    assert "need counts" in res.summary["skipped"]


def test_small_doublet_groups_are_left_unscored(canonical):
    from cellatlas.qc import score_doublets

    a = canonical.copy()
    a.obs[keys.DONOR] = pd.Categorical(["small"] * 40 + ["big"] * (a.n_obs - 40))
    assert score_doublets(a, group=keys.DONOR) == 40
    assert a.obs["doublet_score"][:40].isna().all() and a.obs["doublet_score"][40:].notna().all()
    assert not a.obs["predicted_doublet"][:40].any()



@pytest.mark.parametrize("consume", [True, False])
def test_subset_equals_anndatas_subset(canonical, consume, monkeypatch):
    from cellatlas import qc

    monkeypatch.setattr(qc, "BLOCK", 37)  # many blocks, the last one short
    rng = np.random.default_rng(0)
    cells = rng.random(canonical.n_obs) < 0.7
    detected = qc.detected_in(canonical.X, cells)
    np.testing.assert_array_equal(detected, np.asarray((canonical.X[cells] > 0).sum(axis=0)).ravel())
    genes = detected >= 3
    assert 0 < genes.sum() < canonical.n_vars
    expected = canonical[cells][:, genes].copy()
    given = canonical.copy()
    out = qc.subset(given, cells, genes, consume=consume)
    assert (given.X is None) == consume
    assert out.X.nnz == expected.X.nnz and (out.X != expected.X).nnz == 0
    np.testing.assert_array_equal(out.X.indptr, expected.X.indptr)
    pd.testing.assert_frame_equal(out.obs, expected.obs)
    pd.testing.assert_frame_equal(out.var, expected.var)


def test_subset_drops_the_categories_it_empties(canonical):
    from cellatlas import qc

    batches = canonical.obs[keys.BATCH].cat.categories
    cells = (canonical.obs[keys.BATCH] != batches[0]).to_numpy()
    expected = canonical[cells].copy()
    out = qc.subset(canonical.copy(), cells, np.ones(canonical.n_vars, dtype=bool), consume=True)
    assert list(out.obs[keys.BATCH].cat.categories) == list(batches[1:])
    pd.testing.assert_frame_equal(out.obs, expected.obs)


def test_metrics_block_by_block_are_scanpys(canonical):
    import scanpy as sc

    from cellatlas import qc

    expected = canonical.copy()
    expected.var["mt"] = expected.var_names.str.startswith(qc.MITO_PREFIXES)
    expected.var["ribo"] = expected.var_names.str.startswith(qc.RIBO_PREFIXES)
    sc.pp.calculate_qc_metrics(expected, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True)
    given = canonical.copy()
    qc.compute_metrics(given, block=37)  # many blocks, the last one short
    assert expected.var["mt"].any() and given.n_obs % 37
    pd.testing.assert_frame_equal(given.obs, expected.obs)  # the cells' metrics: the same numbers
    for column in ("mt", "ribo", "n_cells_by_counts", "pct_dropout_by_counts"):
        pd.testing.assert_series_equal(given.var[column], expected.var[column])
    for column in ("mean_counts", "total_counts"):  # float32 running sums against float64 ones
        np.testing.assert_allclose(given.var[column], expected.var[column], rtol=1e-6)
        assert given.var[column].dtype == expected.var[column].dtype
