"""Labels you can trust: reliability and calibration error, conformal prediction sets, held-out
reference cells, and the rules that choose a mapping method and break ties between models."""

import numpy as np
import pandas as pd
import pytest
from cellatlas.atlas import calibration as cal
from cellatlas.errors import AtlasError
from cellatlas.metrics import expected_calibration_error, reliability


def test_reliability_and_calibration_error_on_a_hand_made_case():
    # 10 cells at 0.95 with 9 right, 10 at 0.35 with 5 right, 1 at exactly 1.0 (the last bin) and right
    conf = np.r_[np.full(10, 0.95), np.full(10, 0.35), 1.0]
    right = np.r_[np.ones(9), 0, np.ones(5), np.zeros(5), 1]
    table = reliability(conf, right)
    top = table.loc[9]
    assert top["n_cells"] == 11 and top["mean_confidence"] == pytest.approx((9.5 + 1) / 11)
    assert top["accuracy"] == pytest.approx(10 / 11)
    assert table.loc[3, "n_cells"] == 10 and table.loc[3, "accuracy"] == pytest.approx(0.5)
    assert table["n_cells"].sum() == 21 and np.isnan(table.loc[0, "accuracy"])
    expected = 11 / 21 * abs(10 / 11 - 10.5 / 11) + 10 / 21 * abs(0.5 - 0.35)
    assert expected_calibration_error(table) == pytest.approx(expected)


def test_calibration_error_agrees_with_torchmetrics():
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.2, 1.0, 5000)
    right = rng.random(5000) < conf ** 2  # overconfident
    ours = expected_calibration_error(reliability(conf, right))
    theirs = float(binary_calibration_error(torch.tensor(conf, dtype=torch.float64), torch.tensor(right.astype(int)),
                                            n_bins=10, norm="l1"))
    assert ours == pytest.approx(theirs, abs=1e-6) and ours > 0.1


class _Constant:
    def __init__(self, value):
        self.value = value

    def random(self, shape):
        return np.full(shape, self.value)


def test_p_values_bracket_crepes_unsmoothed_ones():
    from crepes.base import p_values_batch

    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 5, 200) / 4  # many ties, as vote shares have
    scores = rng.integers(0, 5, (50, 3)) / 4
    crepes = p_values_batch(calibration, scores, smoothing=False)
    # crepes' unsmoothed p-value is the smoothed one with u = 1; u = 0 counts only the strictly larger
    assert np.allclose(cal.p_values(calibration, scores, _Constant(1.0)), crepes)
    strictly = np.array([[np.sum(calibration > s) / 201 for s in row] for row in scores])
    assert np.allclose(cal.p_values(calibration, scores, _Constant(0.0)), strictly)


def _simulated_heldout(n=3000, n_labels=5, *, shift=2.0, seed=0, vote_shares=False):
    """Held-out cells of an overconfident model (softmax of logits with the true label raised)."""
    rng = np.random.default_rng(seed)
    classes = np.array([f"c{i}" for i in range(n_labels)])
    true = rng.integers(0, n_labels, n)
    logits = rng.normal(size=(n, n_labels)) * 2
    logits[np.arange(n), true] += shift
    P = np.exp(logits)
    P /= P.sum(axis=1, keepdims=True)
    if vote_shares:  # 15 neighbours' votes: few distinct values, many ties
        P = np.stack([np.bincount(rng.choice(n_labels, 15, p=p), minlength=n_labels) / 15 for p in P])
    table = pd.DataFrame({"label": classes[true], "fold": rng.integers(0, 5, n), "best_label": classes[P.argmax(1)],
                          "confidence": P.max(1), "distance": rng.gamma(4.0, size=n)})
    for i, c in enumerate(classes):
        table[f"score_{c}"] = P[:, i]
    return cal.HeldOut(table)


@pytest.mark.parametrize("vote_shares", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_prediction_sets_cover_the_true_label_as_promised(alpha, vote_shares):
    held = _simulated_heldout(vote_shares=vote_shares)
    crossed, _ = cal.cross_fit(held, alpha=alpha, seed=0)
    metrics, _, coverage = cal.summarize(crossed)
    assert abs(metrics["coverage"] - (1 - alpha)) <= 0.02
    assert (coverage["label"] == "all").sum() == 1 and len(coverage) == 6
    assert coverage.loc[coverage["label"] != "all", "coverage"].between(1 - alpha - 0.06, 1 - alpha + 0.06).all()
    # a set lists its labels, and a covered cell's set holds its label
    row = crossed[crossed["covered"]].iloc[0]
    assert row["label"] in row["label_set"].split("|") and row["set_size"] == len(row["label_set"].split("|"))


def test_support_flags_weak_votes_never_sure_calls():
    """A perfectly separated reference: every held-out cell's vote is unanimous and right. Exact
    coverage at alpha 0.1 empties a tenth of the sets at random, but the best label's support
    (an unsmoothed p-value among that label's held-out cells) stays 1 for a unanimous cell and is
    tiny for a split vote."""
    held = _simulated_heldout(shift=50.0, vote_shares=True)
    assert (held.table["confidence"] == 1).all() and held.correct().all()
    crossed, _ = cal.cross_fit(held, alpha=0.1, seed=0)
    assert abs(crossed["covered"].mean() - 0.9) <= 0.02 and (crossed["support"] == 1).all()
    fitted = held.fit(alpha=0.1)
    votes = np.array([[1.0, 0, 0, 0, 0], [9 / 15, 6 / 15, 0, 0, 0]])
    applied = fitted.apply(votes.max(axis=1), votes, np.array([1.0, 1.0]))
    n_c0 = int((held.table["label"] == "c0").sum())  # support is judged among the best label's own cells
    assert applied.support[0] == 1 and applied.support[1] == pytest.approx(1 / (n_c0 + 1))
    assert not applied.sets[1].any()


def test_typicality_is_a_conformal_p_value():
    rng = np.random.default_rng(2)
    reference, new = rng.gamma(4.0, size=4000), rng.gamma(4.0, size=4000)
    typical = cal.typicality(new, reference)
    assert abs(np.mean(typical <= 0.05) - 0.05) < 0.01 and typical.max() <= 1
    far = cal.typicality(np.array([100.0]), reference)
    assert far[0] == pytest.approx(1 / 4001)


def test_calibration_brings_the_error_down_on_cells_it_was_not_fitted_on():
    metrics, table, _ = cal.summarize(cal.cross_fit(_simulated_heldout(), alpha=0.1)[0])
    assert metrics["ece_raw"] > 0.1 and metrics["ece"] <= 0.05
    assert set(table["confidence"]) == {"raw", "calibrated"}


def test_calibration_is_reproducible():
    held = _simulated_heldout(vote_shares=True)
    a, b = cal.cross_fit(held, alpha=0.1, seed=4)[0], cal.cross_fit(held, alpha=0.1, seed=4)[0]
    pd.testing.assert_frame_equal(a, b)


def test_too_few_heldout_cells_is_a_one_line_error():
    held = _simulated_heldout(n=60)
    with pytest.raises(AtlasError, match=r"atlas 'a'.*method 'projection': 60 held-out reference cells in 5 fold\(s\)"):
        cal.check_heldout(held, atlas="a", method="projection", alpha=0.1)
    with pytest.raises(AtlasError, match=r"atlas.alpha 0.001 needs 1000"):
        cal.check_heldout(_simulated_heldout(n=500), atlas="a", method="projection", alpha=0.001)
    cal.check_heldout(_simulated_heldout(n=500), atlas="a", method="projection", alpha=0.1)


def test_folds_are_grouped_so_a_cell_is_never_labelled_by_its_own_donor():
    """Each donor's cells sit on the same points with the other label: labelled by its own donor
    a cell would be right, by the other donor's cells it is wrong every time."""
    import anndata as ad
    from cellatlas.atlas.methods import heldout_knn

    rng = np.random.default_rng(1)
    points = rng.normal(size=(60, 5)) * 10
    labels = np.r_[np.where(np.arange(60) % 2, "a", "b"), np.where(np.arange(60) % 2, "b", "a")]
    ref = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(labels), "group": np.repeat(["d0", "d1"], 60)},
                                      index=[f"c{i}" for i in range(120)]),
                     obsm={"X_pca": np.vstack([points, points + 1e-3])})
    held = heldout_knn(ref, "X_pca", n_neighbors=1)
    assert len(held.table) == 120 and held.table["fold"].nunique() == 2
    assert np.allclose(held.table["distance"], np.sqrt(5) * 1e-3, atol=2e-4)  # the other donor's twin, not its own cell
    assert (held.table["best_label"] != held.table["label"]).all()
    assert held.classes == ["a", "b"] and np.allclose(held.scores().sum(axis=1), 1)


def test_classify_ties_go_to_the_better_calibrated_model():
    from cellatlas import keys
    from cellatlas.classify.compare import compare

    def folds(f1):
        return pd.DataFrame({"fold": range(5), "n_train": 80, "n_test": 20, "accuracy": f1, "balanced_accuracy": f1,
                             "macro_f1": f1, "fit_seconds": 1.0})

    tables = {"a_model": folds([1.0] * 5), "b_model": folds([1.0] * 5), "c_model": folds([0.9] * 5)}
    table, _, summary = compare(tables, kind=keys.CLASSIFICATION, ece={"a_model": 0.08, "b_model": 0.01})
    assert list(table["model"]) == ["b_model", "a_model", "c_model"] and summary["best_model"] == "b_model"
    table, _, _ = compare(tables, kind=keys.CLASSIFICATION, ece={"a_model": 0.01, "b_model": 0.08})
    assert list(table["model"]) == ["a_model", "b_model", "c_model"]


def test_the_atlas_comparison_names_the_best_method_by_its_rule():
    from cellatlas.atlas.stages import rank_methods

    table = pd.DataFrame({"atlas": "a", "reference": "r", "query": "q", "method": ["classifier", "latent", "projection"],
                          "accuracy": [0.95, 0.95, 0.90], "unassigned_novel": [0.1, 0.9, 0.2],
                          "n_shared_type_cells": 900, "n_novel_type_cells": 100,
                          "heldout_accuracy": 0.9, "heldout_ece": [0.02, 0.03, 0.01]})
    ranked, rule = rank_methods(table)
    # scores 0.865, 0.945, 0.83: the share of cells handled right, a novel cell right when unassigned
    assert list(ranked["method"]) == ["latent", "classifier", "projection"] and ranked["chosen"].tolist() == [1, 0, 0]
    assert ranked["score"].round(4).tolist() == [0.945, 0.865, 0.83]
    assert rule.startswith("share of labelled query cells handled right")
    # tied scores: the lower held-out calibration error, then the simpler method
    tied = table.assign(unassigned_novel=np.nan, accuracy=0.95)
    assert list(rank_methods(tied)[0]["method"]) == ["projection", "classifier", "latent"]
    no_labels = table.assign(accuracy=np.nan, unassigned_novel=np.nan, heldout_accuracy=[0.8, 0.9, 0.9],
                             heldout_ece=[0.0, 0.02, 0.02])
    ranked, rule = rank_methods(no_labels)
    assert list(ranked["method"]) == ["projection", "latent", "classifier"]
    assert rule.startswith("accuracy on held-out reference cells")


def test_query_coverage_counts_the_cells_whose_set_holds_their_label():
    from cellatlas.atlas.evaluate import evaluate

    truth = pd.Series(["x", "x", "y", "new"])
    pred = pd.Series(["x", "y", "unassigned", "x"])
    sets = pd.Series(["x", "y", "x|y", np.nan])
    metrics, per_label, _ = evaluate(pred, truth, ["x", "y"], label_set=sets)
    assert metrics["set_coverage"] == pytest.approx(2 / 3) and metrics["empty_set_novel"] == 1.0
    assert per_label.set_index("query_label")["set_coverage"].to_dict()["x"] == 0.5


def test_query_accuracy_of_the_calls_made_and_of_every_cell_forced_to_its_best_label():
    from cellatlas.atlas.evaluate import evaluate

    truth = pd.Series(["x", "x", "y", "y", "new"])
    pred = pd.Series(["x", "unassigned", "y", "x", "unassigned"])
    best = pd.Series(["x", "x", "y", "x", "y"])
    metrics, _, _ = evaluate(pred, truth, ["x", "y"], best_label=best)
    assert metrics["accuracy"] == 0.5  # an unassigned shared-type cell is wrong
    assert metrics["assigned_accuracy"] == pytest.approx(2 / 3)
    assert metrics["forced_accuracy"] == 0.75  # the novel cell's best label does not count
    assert "forced_accuracy" not in evaluate(pred, truth, ["x", "y"])[0]


def test_a_correspondence_table_scores_a_query_that_names_types_differently():
    from cellatlas.atlas.evaluate import evaluate

    truth = pd.Series(["Monocyte", "Monocyte", "T cell", "T cell", "Progenitor", "B"])
    pred = pd.Series(["CD14 Mono", "FCGR3A Mono", "CD4 T", "B", "unassigned", "B"])
    table = {"Monocyte": ["CD14 Mono", "FCGR3A Mono"], "T cell": ["CD4 T", "CD8 T"], "Progenitor": []}
    reference = ["B", "CD14 Mono", "FCGR3A Mono", "CD4 T", "CD8 T"]
    metrics, per_label, crosstab = evaluate(pred, truth, reference, correspondence=table)
    # B is not in the table: it accepts the reference label of its own name
    assert metrics["n_shared_type_cells"] == 5 and metrics["n_novel_type_cells"] == 1
    assert metrics["accuracy"] == pytest.approx(4 / 5) and metrics["unassigned_novel"] == 1.0
    rows = per_label.set_index("query_label")
    assert rows.loc["T cell", "recall"] == 0.5 and rows.loc["T cell", "accepted"] == "CD4 T|CD8 T"
    assert not rows.loc["Progenitor", "in_reference"]
    # without the table only B scores: the crosstab still says where each label went
    plain, _, crosstab = evaluate(pred, truth, reference)
    assert plain["n_shared_type_cells"] == 1 and crosstab.loc["Monocyte", "FCGR3A Mono"] == 1


def test_a_correspondence_table_for_another_atlas_query_is_a_config_error():
    from cellatlas.config import atlases, validate
    from test_config import SCHEMA, _atlas_config

    cfg = _atlas_config({"reference": "ref", "queries": ["q"], "correspondence": {"ref": {"x": ["y"]}}})
    with pytest.raises(Exception, match=r"^config key 'atlas.atlases.a.correspondence': 'ref' is not one of the "
                                        r"atlas's queries \(q\)$"):
        atlases(validate(cfg, SCHEMA))
    cfg["atlas"]["atlases"]["a"]["correspondence"] = {"q": {"x": ["y"]}}
    assert atlases(validate(cfg, SCHEMA))["a"]["correspondence"] == {"q": {"x": ["y"]}}


def test_leaving_a_type_out_measures_how_well_the_rule_catches_it():
    """Held-out cells of types a and b; the left-out rows relabel each cell without its own type.
    Cells of a left out sit far away with split votes; cells of b left out look like any other."""
    rng = np.random.default_rng(5)
    n = 400

    def rows(labels, votes_a, distance, fold):
        t = pd.DataFrame({"label": labels, "fold": fold, "best_label": np.where(votes_a >= 0.5, "a", "b"),
                          "confidence": np.maximum(votes_a, 1 - votes_a), "distance": distance})
        t["score_a"], t["score_b"] = votes_a, 1 - votes_a
        return t

    labels = np.repeat(["a", "b"], n // 2)
    votes = np.where(labels == "a", 1.0, 0.0)
    fold = rng.integers(0, 4, n)
    table = rows(labels, votes, rng.gamma(4.0, size=n), fold)
    left_out = pd.concat([rows(np.full(n // 2, "a"), np.full(n // 2, 0.4), rng.gamma(4.0, size=n // 2) + 20,
                               fold[: n // 2]),
                          rows(np.full(n // 2, "b"), np.full(n // 2, 1.0), rng.gamma(4.0, size=n // 2),
                               fold[n // 2:])])
    crossed, lo = cal.cross_fit(cal.HeldOut(table, left_out=left_out), alpha=0.1)
    metrics, novel = cal.novelty(crossed, lo, min_confidence=0.5, novelty_alpha=0.01)
    novel = novel.set_index("left_out")
    assert novel.loc["a", "auroc_typicality"] > 0.99 and novel.loc["a", "auroc_support"] == 1.0
    assert novel.loc["a", "unassigned_novel"] == 1.0
    assert novel.loc["b", "auroc_support"] == 0.5 and novel.loc["b", "unassigned_novel"] < 0.05
    assert novel.loc["b", "unassigned_known"] < 0.05 and list(novel["n_cells"]) == [200, 200]
    assert metrics["novel/auroc_typicality"] == pytest.approx(novel["auroc_typicality"].mean())
    # the classifier has no left-out rows: an empty table, no metrics
    none_metrics, none_table = cal.novelty(crossed, None, min_confidence=0.5)
    assert none_metrics == {} and none_table.empty and "auroc_support" in none_table


def test_a_hard_label_is_covered_as_well_as_the_easy_ones():
    """One label's cells are never scored above 0.6 while the others are sure: a single pool would
    leave that label's true scores in the pool's worst tenth, class-conditional sets cover it."""
    held = _simulated_heldout(n=4000, shift=4.0)
    table = held.table.copy()
    hard = table["label"] == "c4"
    table.loc[hard, "score_c4"] = np.minimum(table.loc[hard, "score_c4"], 0.6)
    crossed, _ = cal.cross_fit(cal.HeldOut(table), alpha=0.1)
    per = cal.coverage_table(crossed).set_index("label")["coverage"]
    assert per.drop("all").between(0.86, 0.94).all(), per


def test_the_classifiers_heldout_cells_keep_integer_labels_and_get_folds_when_the_task_has_one():
    """A task whose labels are integer codes, one test fold (the batches split), and an unlabelled
    cell that reads back as NaN: the labels stay '1', not '1.0', and the cells get 5 folds."""
    import anndata as ad
    from cellatlas.atlas.methods import heldout_classifier

    rng = np.random.default_rng(0)
    n = 300
    ref = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), obsm={"X_pca": rng.normal(size=(n, 4))})
    target = rng.integers(1, 3, n).astype(str).astype(object)
    target[0] = None
    p1 = np.clip(rng.random(n), 0.01, 0.99)
    predictions = pd.DataFrame({"cell": ref.obs_names, "target": target, "test_fold": 0,
                                "prob_1": p1, "prob_2": 1 - p1,
                                "source": ["final_model"] + ["out_of_fold"] * (n - 1)})
    path = f"{pytest.importorskip('tempfile').mkdtemp()}/p.tsv.gz"
    predictions.to_csv(path, sep="\t", index=False)
    read = pd.read_csv(path, sep="\t", dtype={"cell": str, "target": str, "prediction": str})
    held = heldout_classifier(read, ref, n_neighbors=5)
    assert set(held.table["label"]) == {"1", "2"} and held.classes == ["1", "2"]
    assert held.table["fold"].nunique() == 5 and len(held.table) == n - 1
    assert held.correct().mean() > 0.3 and held.table["distance"].gt(0).all()


def test_a_correspondence_naming_a_label_the_reference_lacks_is_a_one_line_error():
    from cellatlas.atlas.evaluate import check_correspondence

    with pytest.raises(AtlasError, match=r"^atlas 'a': query 'q': atlas.atlases.a.correspondence names labels "
                                         r"reference 'r' lacks: Mono \(its labels: B, T\)$"):
        check_correspondence({"Monocyte": ["Mono"], "B cell": ["B"]}, ["T", "B"], atlas="a", reference="r", query="q")
    check_correspondence({"B cell": ["B"], "Progenitor": []}, ["T", "B"], atlas="a", reference="r", query="q")
