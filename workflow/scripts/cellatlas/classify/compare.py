"""Paired comparison of models evaluated on the same folds.

Fold scores are not independent (training sets overlap), so a plain paired t-test is too
liberal. The default is Nadeau and Bengio's corrected resampled t-test (Machine Learning 52,
2003), which inflates the variance by ``n_test / n_train``; the alternative is the Wilcoxon
signed-rank test (note: with 5 folds its smallest two-sided p-value is 0.0625). P-values of all
pairs are adjusted with Holm's method.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellatlas import keys

TESTS = {
    "corrected_ttest": "corrected resampled t-test (Nadeau & Bengio 2003), Holm-adjusted",
    "wilcoxon": "Wilcoxon signed-rank test, Holm-adjusted",
}


def corrected_ttest(diff: np.ndarray, n_train: float, n_test: float) -> tuple[float, float, int]:
    """``(t, two-sided p, df)`` for per-fold score differences ``diff``."""
    from scipy import stats

    k = len(diff)
    df = k - 1
    var = np.var(diff, ddof=1)
    mean = float(np.mean(diff))
    if var == 0:
        return (0.0, 1.0, df) if mean == 0 else (float(np.sign(mean) * np.inf), 0.0, df)
    t = mean / np.sqrt((1.0 / k + n_test / n_train) * var)
    return float(t), float(2 * stats.t.sf(abs(t), df)), df


def holm(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adj = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, (m - i) * p[j])
        adj[j] = min(1.0, running)
    return adj


def compare(fold_tables: dict[str, pd.DataFrame], *, kind: str, test: str = "corrected_ttest", alpha: float = 0.05,
            ece: dict[str, float] | None = None):
    """Rank models by the task's primary metric and test every pair on the shared folds.

    Models whose mean primary metric agrees to 4 decimals are tied; a tie goes to the better
    calibrated model (lower expected calibration error ``ece`` of its out-of-fold probabilities;
    a model without probabilities comes after), then to the model listed first (the task's order).

    Parameters
    ----------
    fold_tables
        ``{model: per-fold table}`` as written by the model jobs (columns ``fold``, ``n_train``,
        ``n_test`` and the metrics).

    Returns
    -------
    ``(table, pairwise, summary)``: one row per model (mean and sd of each metric, rank, p-value
    against the best model, whether it is significantly worse); one row per pair (mean
    difference, statistic, p, Holm-adjusted p); and a dict with the best model, the test's name
    and one sentence saying which differences are real.
    """
    from scipy import stats

    if test not in TESTS:
        raise ValueError(f"unknown test {test!r} (one of {list(TESTS)})")
    metric = keys.PRIMARY_METRIC[kind]
    metrics = keys.CLASSIFICATION_METRICS if kind == keys.CLASSIFICATION else keys.REGRESSION_METRICS
    folds = {m: t.sort_values("fold").reset_index(drop=True) for m, t in fold_tables.items()}
    reference = next(iter(folds.values()))
    for m, t in folds.items():
        if not t["fold"].equals(reference["fold"]) or not t["n_test"].equals(reference["n_test"]):
            raise ValueError(f"model '{m}' was not evaluated on the same folds as the others")
    n_splits = len(reference)
    n_train, n_test = float(reference["n_train"].mean()), float(reference["n_test"].mean())

    rows = []
    for m, t in folds.items():
        row = {"model": m, "n_folds": n_splits}
        for name in metrics:
            row[f"{name}_mean"] = float(t[name].mean())
            row[f"{name}_sd"] = float(t[name].std(ddof=1)) if n_splits > 1 else 0.0
        row["fit_seconds_mean"] = float(t["fit_seconds"].mean()) if "fit_seconds" in t else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table["ece"] = [np.nan if ece is None else ece.get(m, np.nan) for m in table["model"]]
    table = table.assign(_score=-table[f"{metric}_mean"].round(4), _ece=table["ece"].fillna(np.inf)).sort_values(
        ["_score", "_ece"], kind="stable").drop(columns=["_score", "_ece"]).reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    best = table.loc[0, "model"]

    pairs = []
    names = list(table["model"])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = folds[a][metric].to_numpy() - folds[b][metric].to_numpy()
            row = {"model_a": a, "model_b": b, "metric": metric, "mean_difference": float(diff.mean()), "n_folds": n_splits}
            if n_splits < 2:
                row.update(statistic=np.nan, df=np.nan, p_value=np.nan)
            elif test == "corrected_ttest":
                t_, p_, df_ = corrected_ttest(diff, n_train, n_test)
                row.update(statistic=t_, df=df_, p_value=p_)
            else:
                if np.all(diff == 0):
                    row.update(statistic=0.0, df=np.nan, p_value=1.0)
                else:
                    res = stats.wilcoxon(diff, zero_method="zsplit")
                    row.update(statistic=float(res.statistic), df=np.nan, p_value=float(res.pvalue))
            pairs.append(row)
    pairwise = pd.DataFrame(
        pairs, columns=["model_a", "model_b", "metric", "mean_difference", "n_folds", "statistic", "df", "p_value"]
    )
    testable = pairwise["p_value"].notna().to_numpy()
    pairwise["p_holm"] = np.nan
    if testable.any():
        pairwise.loc[testable, "p_holm"] = holm(pairwise.loc[testable, "p_value"].to_numpy())
    pairwise["significant"] = pairwise["p_holm"] < alpha
    pairwise["test"] = test

    table["p_vs_best"] = np.nan
    table["worse_than_best"] = False
    for idx, m in table["model"].items():
        if m == best:
            continue
        hit = pairwise[(pairwise.model_a == best) & (pairwise.model_b == m)]
        table.loc[idx, "p_vs_best"] = hit["p_holm"].iloc[0]
        table.loc[idx, "worse_than_best"] = bool(hit["significant"].iloc[0])

    tied = [m for m in table["model"] if m != best and not table.set_index("model").loc[m, "worse_than_best"]]
    if len(names) == 1:
        sentence = f"{best} is the only model of this task; there is nothing to compare."
    elif n_splits < 2:
        sentence = f"{best} scores highest on {metric}; with one split no difference can be tested."
    elif not tied:
        sentence = f"{best} has the highest {metric} and is significantly better than every other model."
    else:
        sentence = (
            f"{best} has the highest {metric}; its difference to {', '.join(tied)} is not significant "
            f"(alpha {alpha}), to the others it is."
            if len(tied) < len(names) - 1
            else f"{best} has the highest {metric}, but no difference between models is significant (alpha {alpha})."
        )
    summary = {"best_model": best, "metric": metric, "test": TESTS[test], "alpha": alpha, "n_folds": n_splits,
               "conclusion": sentence}
    return table, pairwise, summary
