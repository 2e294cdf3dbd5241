"""Integration: scIB metrics on hand-made cases, the graph neighbours, the choice rule, the
methods on simulated batches, held-out placement and bad inputs."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellatlas.errors import ConfigError, InputDataError
from cellatlas.integrate import METHODS
from cellatlas.integrate.scores import K_KBET, choose, embedding_neighbors, kbet_per_label, score, shortest_path_neighbors


def _blobs(shift_batch: float, *, n=300, seed=0):
    """Two cell types far apart; two batches either drawn alike (shift 0) or moved apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b"], n // 2)
    batches = np.tile(["x", "y"], n // 2)
    X = rng.normal(size=(n, 6))
    X[labels == "b", 0] += 30
    X[batches == "y", 1] += shift_batch
    return X, labels, batches


def test_scores_perfect_mixing_against_perfect_separation():
    X, labels, batches = _blobs(0.0)
    mixed = score(labels=labels, batches=batches, embedding=X, unintegrated=X)
    X2, *_ = _blobs(60.0)
    apart = score(labels=labels, batches=batches, embedding=X2, unintegrated=X2)
    assert mixed["ilisi"] > 0.85 and apart["ilisi"] < 0.05
    assert mixed["kbet"] > 0.8 and apart["kbet"] < 0.1
    assert mixed["bras"] > 0.9 and apart["bras"] < 0.5
    assert mixed["batch_correction"] > apart["batch_correction"] + 0.4
    # the types stay apart in both: biology is kept
    for s in (mixed, apart):
        assert s["clisi"] == pytest.approx(1.0, abs=1e-3) and s["label_asw"] > 0.5
    assert mixed["ari"] == pytest.approx(1.0) and mixed["nmi"] == pytest.approx(1.0)
    assert mixed["total"] == pytest.approx(0.4 * mixed["batch_correction"] + 0.6 * mixed["bio_conservation"])


def test_kbet_searches_each_label_exactly_and_agrees_with_scib_metrics_own(monkeypatch):
    """Within a label kBET's search is exact, with no pynndescent index (numba cannot cache its
    compiled code: every job compiled it again), and the score is scib-metrics' own with its
    pynndescent search, at every batch shift; scib-metrics' search is restored after."""
    import scib_metrics
    from scib_metrics.nearest_neighbors import _pynndescent

    original = scib_metrics.nearest_neighbors.pynndescent
    theirs, ours = [], []
    for shift in (0.0, 0.7, 1.5, 60.0):
        X, labels, batches = _blobs(shift, n=800, seed=3)
        nn = embedding_neighbors(X, K_KBET)
        theirs.append(float(scib_metrics.kbet_per_label(nn, batches, labels)))
        with monkeypatch.context() as m:
            m.setattr(_pynndescent, "NNDescent", lambda *a, **k: pytest.fail("pynndescent index built"))
            ours.append(kbet_per_label(nn, batches, labels))
    assert scib_metrics.nearest_neighbors.pynndescent is original
    assert ours[0] > 0.8 and ours[-1] < 0.1 and 0.1 < ours[1] < 0.9, ours  # one partly mixed case
    assert ours == sorted(ours, reverse=True)
    np.testing.assert_allclose(ours, theirs, atol=0.03)


def test_scores_see_cell_types_merged():
    X, labels, batches = _blobs(0.0)
    merged = X.copy()
    merged[:, 0] = np.random.default_rng(1).normal(size=len(X))  # the types' difference removed
    lost = score(labels=labels, batches=batches, embedding=merged, unintegrated=X)
    kept = score(labels=labels, batches=batches, embedding=X, unintegrated=X)
    assert lost["clisi"] < 0.3 and lost["ari"] < 0.1 and kept["bio_conservation"] > lost["bio_conservation"] + 0.4
    # no labels: biology cannot be scored, and neither can the per-label batch metrics
    none = score(labels=None, batches=batches, embedding=X, unintegrated=X)
    assert np.isnan(none["bio_conservation"]) and np.isnan(none["kbet"]) and np.isnan(none["total"])
    assert none["ilisi"] == pytest.approx(kept["ilisi"])


def test_graph_neighbours_are_the_shortest_paths():
    from scipy.sparse.csgraph import dijkstra
    from sklearn.neighbors import kneighbors_graph

    X = np.random.default_rng(0).normal(size=(120, 3))
    g = kneighbors_graph(X, 4, mode="distance")
    near = shortest_path_neighbors(g, 20)
    exact = dijkstra(sp.csr_matrix(g).maximum(sp.csr_matrix(g).T), directed=False)
    assert (near.indices[:, 0] == np.arange(120)).all()
    np.testing.assert_allclose(near.distances, np.sort(exact, axis=1)[:, :20], rtol=1e-9)
    # a graph method is scored on those neighbours: BBKNN-like graph of well-mixed batches
    X, labels, batches = _blobs(0.0)
    s = score(labels=labels, batches=batches, graph=kneighbors_graph(X, 6, mode="distance"))
    assert s["ilisi"] > 0.8 and np.isnan(s["bras"]) and np.isnan(s["label_asw"]) and s["ari"] == pytest.approx(1.0)


def _table(**totals):
    rows = []
    for method, (total, bio) in totals.items():
        rows.append({"method": method, "status": "ok", "n_batches": 2, "total": total, "bio_conservation": bio})
    return pd.DataFrame(rows)


def test_choice_rule():
    pick = lambda t, **kw: choose(t, **{"use": "best", "max_bio_loss": 0.05, "order": METHODS, **kw})  # noqa: E731
    assert pick(_table(pca=(0.6, 0.9), harmony=(0.8, 0.88), vae=(0.7, 0.9)))[0] == "harmony"
    # a method that loses biology beyond max_bio_loss is not chosen, whatever its total
    method, reason = pick(_table(pca=(0.6, 0.9), harmony=(0.8, 0.80), vae=(0.7, 0.9)))
    assert method == "vae" and "harmony" in reason
    assert pick(_table(pca=(0.6, 0.9), harmony=(0.8, 0.80)), max_bio_loss=0.2)[0] == "harmony"
    # ties go to the simpler method (METHODS order), never to the name
    method, reason = pick(_table(pca=(0.6, 0.9), vae=(0.75, 0.9), combat=(0.75, 0.9)))
    assert method == "combat" and "tied" in reason
    # a method that learned the labels it is scored on is never best, only taken when named
    method, reason = pick(_table(pca=(0.6, 0.9), harmony=(0.8, 0.9), vae_labels=(0.95, 0.99)))
    assert method == "harmony" and "not ranked, having learned the labels" in reason
    assert pick(_table(pca=(0.6, 0.9), vae_labels=(0.95, 0.99)), use="vae_labels")[0] == "vae_labels"
    # one batch, no labels: the unintegrated PCA
    one = _table(pca=(np.nan, np.nan), harmony=(np.nan, np.nan)).assign(n_batches=1)
    assert pick(one) == ("pca", "one batch: nothing to integrate")
    assert pick(_table(pca=(np.nan, np.nan), harmony=(np.nan, np.nan)))[0] == "pca"
    # a named method is taken; a named method that failed falls back to the PCA, saying so
    t = _table(pca=(0.6, 0.9), harmony=(0.5, 0.8))
    assert pick(t, use="harmony")[0] == "harmony"
    t.loc[1, "status"] = "failed: singular"
    method, reason = pick(t, use="harmony")
    assert method == "pca" and "failed: singular" in reason
    assert pick(t)[0] == "pca"  # a failed method is never best


@pytest.fixture(scope="module")
def embedded():
    from cellatlas.embed import pca
    from cellatlas.ingest import canonicalize
    from cellatlas.normalize import normalize
    from cellatlas.simulate import simulate_counts

    a = simulate_counts(n_cells=900, n_genes=600, n_types=4, n_donors=4, n_batches=2, batch_sd=0.3, seed=4)
    a = canonicalize(a, "s", label_key="cell_type", batch_key="batch", donor_key="donor")
    normalize(a, "s", target_sum=1e4, n_top_genes=300, batch_aware=True)
    pca(a, n_pcs=20, scale=True, seed=0)
    return a


EMBED = {"n_pcs": 20, "scale": True, "n_neighbors": 10}


def test_harmony_and_bbknn_mix_the_batches_that_pca_keeps_apart(embedded):
    from cellatlas.integrate.stages import _scores
    from cellatlas.integrate.methods import integrate

    rows = {m: _scores(integrate(embedded, m, {}, embed=EMBED), embedded, seed=0, n_neighbors=10)
            for m in ("pca", "harmony", "bbknn", "combat")}
    assert rows["pca"]["batch_mixing"] < 0.2
    for m in ("harmony", "bbknn", "combat"):
        assert rows[m]["batch_mixing"] > 0.7, (m, rows[m])
        assert rows[m]["ilisi"] > rows["pca"]["ilisi"] + 0.5
        assert rows[m]["ari"] >= rows["pca"]["ari"], (m, rows[m])
    # a graph method has no embedding metrics: the choice compares every method on the shared ones
    from cellatlas.integrate.scores import common_total

    table = pd.DataFrame([{**r, "method": m, "status": "ok"} for m, r in rows.items()])
    common = common_total(table)
    assert np.isnan(table.loc[table.method == "bbknn", "bras"]).all()
    assert not np.allclose(common, table["total"]) and common.notna().all()


def test_same_seed_same_scores(embedded):
    from cellatlas.integrate.methods import integrate
    from cellatlas.integrate.stages import _scores

    a, b = (_scores(integrate(embedded, "harmony", {}, embed=EMBED), embedded, seed=0, n_neighbors=10) for _ in range(2))
    assert a == b


def test_heldout_pca_places_the_donor_with_its_type(embedded):
    from cellatlas.integrate.methods import heldout_donor, integrate_heldout

    donor = heldout_donor(embedded)
    assert donor == sorted(embedded.obs["donor"].astype(str).unique())[-1]
    held = embedded.obs["donor"].astype(str).to_numpy() == donor
    it = integrate_heldout(embedded, "pca", donor, embed=EMBED)
    from sklearn.neighbors import KNeighborsClassifier

    labels = embedded.obs["label"].astype(str).to_numpy()
    knn = KNeighborsClassifier(10).fit(it.embedding[~held], labels[~held])
    assert (knn.predict(it.embedding[held]) == labels[held]).mean() > 0.9
    with pytest.raises(ValueError, match="cannot place"):
        integrate_heldout(embedded, "harmony", donor, embed=EMBED)
    assert heldout_donor(embedded, "nobody") is None


def test_bad_batches_and_non_convergence(embedded):
    from cellatlas.integrate.methods import check_batches, integrate

    small = embedded[: embedded.n_obs - 1].copy()
    small.obs["batch"] = small.obs["batch"].astype(str)
    small.obs.iloc[:3, small.obs.columns.get_loc("batch")] = "tiny"
    with pytest.raises(InputDataError, match=r"dataset 's': batch 'tiny' has 3 cells .*integration.min_batch_cells"):
        check_batches(small, "s", min_batch_cells=10)
    it = integrate(embedded, "harmony", {"max_iter": 1, "epsilon": 1e-9}, embed=EMBED)
    assert it.notes and "did not converge in 1 iterations" in it.notes[0]


def test_method_stage_records_one_batch_and_a_failing_method(embedded, tmp_path, monkeypatch):
    from cellatlas.integrate import methods, stages

    one = embedded[embedded.obs["batch"] == embedded.obs["batch"].iloc[0]].copy()
    one.write_h5ad(tmp_path / "one.h5ad")
    settings = {"min_batch_cells": 10, "holdout": True, "holdout_donor": None}
    r = stages.method_stage(h5ad=str(tmp_path / "one.h5ad"), dataset="s", method="harmony", params={},
                            settings=settings, embed=EMBED)
    assert r.tables["scores"]["status"].iloc[0] == "one batch" and "nothing to integrate" in r.notes[0]
    # the PCA stands in, unscored (no batch metric has a meaning), and the choice says why
    pca = stages.method_stage(h5ad=str(tmp_path / "one.h5ad"), dataset="s", method="pca", params={},
                              settings=settings, embed=EMBED)
    row = pca.tables["scores"].iloc[0]
    assert row["status"] == "one batch" and "total" not in row and pca.data["embedding"].obsm["X_integrated"].shape[0] == one.n_obs
    for name, res in (("pca", pca), ("harmony", r)):
        res.tables["scores"].to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
        res.data["embedding"].write_h5ad(tmp_path / f"{name}.h5ad")
    cmp = stages.compare_stage(h5ad=str(tmp_path / "one.h5ad"), dataset="s",
                               embeddings={m: str(tmp_path / f"{m}.h5ad") for m in ("pca", "harmony")},
                               scores=[str(tmp_path / f"{m}.tsv") for m in ("pca", "harmony")], use="best",
                               max_bio_loss=0.05, embed={"n_neighbors": 10, "umap_min_dist": 0.5, "tsne_perplexity": 30})
    assert cmp.records["choice"]["method"] == "pca" and cmp.records["choice"]["reason"] == "one batch: nothing to integrate"
    assert cmp.data["h5ad"].adata.obsm["X_tsne"].shape == (one.n_obs, 2)

    def singular(*a, **k):
        raise np.linalg.LinAlgError("Singular matrix")

    embedded.write_h5ad(tmp_path / "two.h5ad")
    monkeypatch.setattr(methods, "_combat", singular)
    r = stages.method_stage(h5ad=str(tmp_path / "two.h5ad"), dataset="s", method="combat", params={},
                            settings=settings, embed=EMBED)
    assert r.tables["scores"]["status"].iloc[0] == "failed: Singular matrix" and "leaves it out" in r.notes[0]
    with pytest.raises(InputDataError, match=r"^dataset 's': integration.holdout_donor 'nobody' is not one of its donors \(donor_0"):
        stages.method_stage(h5ad=str(tmp_path / "two.h5ad"), dataset="s", method="pca", params={},
                            settings={**settings, "holdout_donor": "nobody"}, embed=EMBED)


def test_config_resolves_the_integrated_datasets():
    from cellatlas.config import integrations

    ds = {"a": {"batch_key": "b"}, "b": {}, "c": {"batch_key": "b", "values": "lognorm"}}
    default = [m for m in METHODS if m != "vae_labels"]
    assert integrations({"datasets": ds, "integration": {}}) == {"a": default, "c": [m for m in default if m != "vae"]}
    assert integrations({"datasets": ds, "integration": {"methods": ["harmony"]}}) == {"a": ["pca", "harmony"], "c": ["pca", "harmony"]}
    with pytest.raises(ConfigError, match="'integration.datasets': dataset 'b' has no batch_key"):
        integrations({"datasets": ds, "integration": {"datasets": ["b"]}})
    with pytest.raises(ConfigError, match="'integration.use': 'bbknn' is not one of"):
        integrations({"datasets": ds, "integration": {"methods": ["harmony"], "use": "bbknn"}})
    with pytest.raises(ConfigError, match="vae_labels learns labels, and dataset 'a' has no label_key"):
        integrations({"datasets": ds, "integration": {"datasets": ["a"], "methods": ["vae_labels"]}})


def test_the_vae_that_learns_labels_draws_types_together_and_places_a_held_out_donor(embedded):
    from cellatlas.integrate.vae import vae_heldout, vae_labels

    vae = {"model": {"max_epochs": 15, "n_latent": 6, "patience": 15}, "trainer": {"accelerator": "cpu"}}
    labelled = vae_labels(embedded, vae=vae, params={"classification_weight": 5.0})
    plain = vae_heldout(embedded, "nobody", method="vae", vae=vae)  # no such donor: every cell in the fit
    from sklearn.metrics import silhouette_score

    labels = embedded.obs["label"].astype(str)
    assert labelled.embedding.shape == (embedded.n_obs, 6) and labelled.info["epochs"] >= 1
    assert silhouette_score(labelled.embedding, labels) > silhouette_score(plain.embedding, labels)
    donor = "donor_3"
    held = vae_heldout(embedded, donor, method="vae_labels", vae=vae, params={"classification_weight": 5.0})
    mask = (embedded.obs["donor"] == donor).to_numpy()
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(10).fit(held.embedding[~mask], labels[~mask])
    assert (knn.predict(held.embedding[mask]) == labels[mask]).mean() > 0.8
