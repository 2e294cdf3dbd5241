"""Figures, drawn with matplotlib directly (no display, no scanpy global state)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 110


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def qc_histograms(obs: pd.DataFrame, thresholds: pd.DataFrame, path: str, *, title: str = "") -> None:
    """One histogram per QC metric with the dataset's bounds as red lines and, where QC bounded
    each provisional cluster apart (a ``group`` other than ``all``), the clusters' as faint ones."""
    metrics = [m for m in ("n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo") if m in obs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    dataset = thresholds["group"] == "all" if "group" in thresholds else np.ones(len(thresholds), dtype=bool)
    for ax, m in zip(axes[0], metrics):
        v = obs[m].to_numpy(dtype=float)
        ax.hist(v, bins=60, color="#4C72B0")
        rows = thresholds[thresholds["metric"] == m]
        for is_dataset, lo, hi in zip(dataset[rows.index], rows["lower"], rows["upper"]):
            for b in (lo, hi):
                if np.isfinite(b):
                    ax.axvline(b, color="#C44E52", lw=1.5 if is_dataset else 0.8, alpha=1.0 if is_dataset else 0.3)
        ax.set_xlabel(m)
        ax.set_ylabel("cells")
    fig.suptitle(title)
    _save(fig, path)


def qc_scatter(obs: pd.DataFrame, path: str, *, title: str = "") -> None:
    """Total counts against detected genes, coloured by mitochondrial percentage."""
    fig, ax = plt.subplots(figsize=(4.8, 4))
    c = obs["pct_counts_mt"] if "pct_counts_mt" in obs else None
    sc = ax.scatter(obs["total_counts"], obs["n_genes_by_counts"], c=c, s=3, cmap="viridis", rasterized=True)
    if c is not None:
        fig.colorbar(sc, ax=ax, label="% mitochondrial")
    ax.set_xlabel("total counts")
    ax.set_ylabel("genes detected")
    ax.set_title(title)
    _save(fig, path)


def hvg_dispersion(var: pd.DataFrame, path: str, *, title: str = "") -> None:
    """Normalized dispersion against mean expression, HVGs highlighted."""
    fig, ax = plt.subplots(figsize=(4.8, 4))
    hv = var["highly_variable"].to_numpy(dtype=bool)
    for mask, color, label in ((~hv, "#BBBBBB", "other"), (hv, "#C44E52", f"highly variable ({hv.sum()})")):
        ax.scatter(var["means"][mask], var["dispersions_norm"][mask], s=3, c=color, label=label, rasterized=True)
    ax.set_xscale("log")
    ax.set_xlabel("mean expression")
    ax.set_ylabel("normalized dispersion")
    ax.legend(frameon=False, markerscale=3)
    ax.set_title(title)
    _save(fig, path)


def pca_variance(ratio: np.ndarray, path: str, *, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot(np.arange(1, len(ratio) + 1), ratio, "o-", ms=3)
    ax.set_xlabel("principal component")
    ax.set_ylabel("variance ratio")
    ax.set_yscale("log")
    ax.set_title(title)
    _save(fig, path)


def embedding(coords: np.ndarray, colors: dict[str, pd.Series], path: str, *, basis: str, title: str = "") -> None:
    """Scatter of a 2-D embedding, one panel per colouring (categorical or numeric)."""
    n = max(1, len(colors))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    order = np.random.default_rng(0).permutation(coords.shape[0])  # no category painted last on top
    size = max(0.5, min(12.0, 30000.0 / max(coords.shape[0], 1)))
    items = list(colors.items()) or [("", None)]
    for ax, (name, values) in zip(axes[0], items):
        xy = coords[order]
        if values is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#4C72B0", rasterized=True)
        elif isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            cat = legend_order(values)
            palette = plt.get_cmap("tab20" if len(cat.categories) > 10 else "tab10")
            codes = cat.codes[order]
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c=palette(codes % palette.N), rasterized=True)
            handles = [
                plt.Line2D([], [], marker="o", ls="", color=palette(i % palette.N), label=str(c))
                for i, c in enumerate(cat.categories)
            ]
            if len(handles) <= 30:
                ax.legend(handles=handles, frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            pts = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=values.to_numpy()[order], cmap="viridis", rasterized=True)
            fig.colorbar(pts, ax=ax)
        ax.set_title(name)
        _embedding_axes(ax, basis)
    fig.suptitle(title)
    _save(fig, path)


def legend_order(values: pd.Series) -> pd.Categorical:
    """``values`` as categories in legend order: cluster numbers by number (0, 1, 2, ..., 10, not
    0, 1, 10, 2), whatever their dtype after an h5ad round trip; missing values as '(none)'."""
    cat = pd.Categorical(values) if isinstance(values.dtype, pd.CategoricalDtype) else pd.Categorical(values.astype(str))
    names = [str(c) for c in cat.categories]
    if names and all(n.isdigit() for n in names):
        cat = cat.reorder_categories(sorted(cat.categories, key=lambda c: int(str(c))))
    if cat.isna().any():
        cat = cat.add_categories("(none)").fillna("(none)")
    return cat


def _embedding_axes(ax, basis: str) -> None:
    """No ticks (embedding coordinates carry no units), axes named after the basis."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{basis} 1")
    ax.set_ylabel(f"{basis} 2")


def annotation_colors(obs: pd.DataFrame) -> dict[str, pd.Series]:
    """The standard annotations a dataset carries (label, batch, donor), for colouring."""
    return {k: obs[k] for k in ("label", "batch", "donor") if k in obs}


def confusion(table: pd.DataFrame, path: str, *, title: str = "") -> None:
    """Confusion matrix normalized per true class (each row sums to 1), counts written in cells."""
    counts = table.to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    n = len(table)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n + 1.5, 1.2 + 0.5 * n + 1))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), [str(c) for c in table.columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in table.index], fontsize=8)
    ax.set_xlabel("predicted (out of fold)")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="fraction of true class", shrink=0.8)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def image_montage(images: np.ndarray, labels: Sequence[str], path: str, *, per_class: int = 8, title: str = "") -> None:
    """A row of example images per class (the first ``per_class`` of each; images are C x H x W
    in [0, 1]: one channel grey, two as blue and green, three or more their first three as RGB)."""
    classes = sorted(set(map(str, labels)))
    labels = np.asarray(labels).astype(str)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(0.9 * per_class + 1.5, 0.95 * len(classes) + 0.6),
                             squeeze=False)
    for i, c in enumerate(classes):
        rows = np.flatnonzero(labels == c)[:per_class]
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(rows):
                img = images[rows[j]]
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
                else:
                    rgb = np.zeros((*img.shape[1:], 3))
                    if img.shape[0] == 2:
                        rgb[..., 2], rgb[..., 1] = img[0], img[1]
                    else:
                        rgb[:] = np.moveaxis(img[:3], 0, -1)
                    ax.imshow(np.clip(rgb, 0, 1))
        axes[i][0].set_ylabel(c, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def predicted_vs_measured(measured: np.ndarray, predicted: np.ndarray, path: str, *, title: str = "") -> None:
    """Out-of-fold predictions against the measured target, with the identity line."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(measured, predicted, s=max(0.5, min(8.0, 20000.0 / max(len(measured), 1))), alpha=0.5, rasterized=True)
    lo = float(np.nanmin([np.nanmin(measured), np.nanmin(predicted)]))
    hi = float(np.nanmax([np.nanmax(measured), np.nanmax(predicted)]))
    ax.plot([lo, hi], [lo, hi], color="#C44E52", lw=1)
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted (out of fold)")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def fold_scores(fold_tables: dict[str, pd.DataFrame], metric: str, path: str, *, title: str = "") -> None:
    """Each model's score per fold (points, one line per fold across models) and its mean."""
    models = sorted(fold_tables, key=lambda m: -fold_tables[m][metric].mean())
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(models), 4))
    folds = sorted(next(iter(fold_tables.values()))["fold"])
    for k in folds:
        ys = [float(fold_tables[m].set_index("fold").loc[k, metric]) for m in models]
        ax.plot(range(len(models)), ys, color="0.75", lw=0.8, zorder=1)
    for i, m in enumerate(models):
        ax.scatter([i] * len(fold_tables[m]), fold_tables[m][metric], s=14, zorder=2, color="#4C72B0")
        ax.plot([i - 0.25, i + 0.25], [fold_tables[m][metric].mean()] * 2, color="#C44E52", lw=2, zorder=3)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} per fold")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def training_curves(history: pd.DataFrame, path: str, *, title: str = "") -> None:
    """Loss per epoch (training and validation), and validation scores when there are any."""
    scores = [c for c in ("val_accuracy", "val_macro_f1") if c in history]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    for col in ("train_loss", "val_loss"):
        if col in history:
            ax.plot(history["epoch"], history[col], marker="o", ms=3, label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    if scores:
        for col in scores:
            axes[0, 1].plot(history["epoch"], history[col], marker="o", ms=3, label=col)
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].legend(frameon=False)
    fig.suptitle(title)
    _save(fig, path)


def joint_embedding(reference: np.ndarray, ref_labels: pd.Series, query: np.ndarray, predicted: pd.Series,
                    confidence: np.ndarray, path: str, *, basis: str, title: str = "") -> None:
    """Reference and query in the reference's map: the reference by label, the query (over the
    reference in grey) by transferred label, and the query by confidence."""
    ref_cat = pd.Categorical(ref_labels.astype(str))
    names = list(ref_cat.categories) + sorted(set(map(str, predicted)) - set(ref_cat.categories))
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    # unassigned in dark grey, apart from the light grey of the reference behind the query
    color = {n: ("#555555" if n == "unassigned" else palette(i % palette.N)) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    size_r = max(0.5, min(10.0, 20000.0 / max(len(reference), 1)))
    size_q = max(0.5, min(12.0, 20000.0 / max(len(query), 1)))
    rng = np.random.default_rng(0)
    ro, qo = rng.permutation(len(reference)), rng.permutation(len(query))
    axes[0].scatter(reference[ro, 0], reference[ro, 1], s=size_r, c=[color[str(v)] for v in ref_cat[ro]], rasterized=True)
    axes[0].set_title("reference, by label")
    axes[1].scatter(reference[:, 0], reference[:, 1], s=size_r, c="#e6e6e6", rasterized=True)
    pred = np.asarray(predicted.astype(str))
    axes[1].scatter(query[qo, 0], query[qo, 1], s=size_q, c=[color[v] for v in pred[qo]], rasterized=True)
    axes[1].set_title("query, by transferred label")
    handles = [plt.Line2D([], [], marker="o", ls="", color=color[n], label=n) for n in names]
    axes[1].legend(handles=handles, frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[2].scatter(reference[:, 0], reference[:, 1], s=size_r, c="#e6e6e6", rasterized=True)
    pts = axes[2].scatter(query[qo, 0], query[qo, 1], s=size_q, c=np.asarray(confidence)[qo], cmap="viridis",
                          vmin=0, vmax=1, rasterized=True)
    fig.colorbar(pts, ax=axes[2], label="confidence")
    axes[2].set_title("query, by confidence")
    for ax in axes:
        _embedding_axes(ax, basis)
    fig.suptitle(title)
    _save(fig, path)


def crosstab(table: pd.DataFrame, path: str, *, title: str = "") -> None:
    """Query labels (rows) against transferred labels (columns), shaded by share of the row."""
    counts = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * max(table.shape[1], 1), 1.8 + 0.45 * max(table.shape[0], 1)))
    if counts.size == 0:
        ax.text(0.5, 0.5, "the query has no labels", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if counts.size <= 900:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(c) for c in table.index], fontsize=8)
    ax.set_xlabel("transferred label")
    ax.set_ylabel("query's own label")
    fig.colorbar(im, ax=ax, label="share of the query label", shrink=0.8)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def marker_dotplot(adata, markers: pd.DataFrame, path: str, *, resolution: float, n_per_cluster: int = 3,
                   title: str = "") -> None:
    """Dot plot of each cluster's top marker genes: dot size the share of the cluster's cells that
    express the gene, colour its mean log-expression scaled to the gene's maximum over clusters."""
    import scipy.sparse as sp

    from cellatlas.keys import leiden_key

    clusters = legend_order(adata.obs[leiden_key(resolution)])
    top = markers[markers["rank"] <= n_per_cluster] if len(markers) else markers
    order = top.assign(number=pd.to_numeric(top["cluster"], errors="coerce")).sort_values(["number", "cluster", "rank"])
    genes = list(dict.fromkeys(order["gene"].astype(str)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(genes) + 2), max(2.5, 0.3 * len(clusters.categories) + 1.5)))
    if genes:
        X = adata[:, genes].X
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        codes = clusters.codes
        mean = np.vstack([X[codes == i].mean(axis=0) for i in range(len(clusters.categories))])
        share = np.vstack([(X[codes == i] > 0).mean(axis=0) for i in range(len(clusters.categories))])
        scaled = mean / np.maximum(mean.max(axis=0, keepdims=True), 1e-12)
        yy, xx = np.meshgrid(np.arange(len(clusters.categories)), np.arange(len(genes)), indexing="ij")
        dots = ax.scatter(xx.ravel(), yy.ravel(), s=share.ravel() * 120, c=scaled.ravel(), cmap="Reds", vmin=0, vmax=1,
                          edgecolors="grey", linewidths=0.3)
        fig.colorbar(dots, ax=ax, shrink=0.6, label="mean expression (of gene's max)")
        ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(clusters.categories)), [str(c) for c in clusters.categories], fontsize=7)
        ax.set_ylabel("Leiden cluster")
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "one cluster: no markers", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def across_invocations(table: pd.DataFrame, path: str, *, max_metrics: int = 12) -> None:
    """One panel per metric (columns, at most ``max_metrics``): its value in each invocation (rows)."""
    metrics = list(table.columns)[:max_metrics]
    cols = min(3, max(1, len(metrics)))
    nrows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    x = range(len(table))
    for ax, metric in zip(axes.ravel(), metrics):
        ax.plot(x, table[metric], marker="o")
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(list(x), [str(i) for i in table.index], rotation=30, ha="right", fontsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_axis_off()
    fig.suptitle("metrics across invocations")
    _save(fig, path)


def integration_scores(table: pd.DataFrame, path: str, *, title: str = "") -> None:
    """scIB-style table: one row per method, its metrics (batch correction, then biology), the
    aggregates and the held-out total, values in the cells; the chosen method starred."""
    from cellatlas.naming import INTEGRATION_BATCH as BATCH_METRICS
    from cellatlas.naming import INTEGRATION_BIO as BIO_METRICS

    columns = [c for c in (*BATCH_METRICS, *BIO_METRICS, "batch_correction", "bio_conservation", "total",
                           "total_common", "heldout_total", "batch_mixing") if c in table]
    values = table[columns].to_numpy(dtype=float)
    rows = [f"{'* ' if chosen else ''}{m}" + ("" if status == "ok" else f" ({status})")
            for m, chosen, status in zip(table["method"], table.get("chosen", False), table["status"])]
    fig, ax = plt.subplots(figsize=(1.6 + 0.78 * len(columns), 1.4 + 0.45 * len(rows)))
    ax.imshow(np.nan_to_num(np.clip(values, 0, 1), nan=0.0), cmap="YlGnBu", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if np.nan_to_num(v) > 0.6 else "black")
    ax.set_xticks(range(len(columns)), [c.replace("_", " ") for c in columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    n_batch = sum(c in BATCH_METRICS for c in columns)
    n_bio = sum(c in BIO_METRICS for c in columns)
    for x in (n_batch - 0.5, n_batch + n_bio - 0.5):
        ax.axvline(x, color="white", lw=3)
    ax.set_title(title + "\n(batch correction | biological conservation | aggregates; * chosen)", fontsize=10)
    _save(fig, path)


def reliability(table: pd.DataFrame, coverage: pd.DataFrame, crossed: pd.DataFrame, left_out: pd.DataFrame | None,
                path: str, *, alpha: float, title: str = "") -> None:
    """Left: observed accuracy against confidence per bin, raw and calibrated (marker area: cells),
    on the diagonal of perfect calibration. Middle: each label's coverage of its prediction sets
    against the promised 1 - alpha. Right (kNN methods): each type left out in turn, the ROC of
    1 - typicality telling its cells from the other types' held-out cells."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 3.9), gridspec_kw={"width_ratios": [1, 1.3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for name, color in (("raw", "#C44E52"), ("calibrated", "#4C72B0")):
        rows = table[(table["confidence"] == name) & (table["n_cells"] > 0)]
        size = 15 + 200 * rows["n_cells"] / max(table["n_cells"].max(), 1)
        ax.plot(rows["mean_confidence"], rows["accuracy"], color=color, lw=1, alpha=0.7)
        ax.scatter(rows["mean_confidence"], rows["accuracy"], s=size, color=color, label=name, alpha=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence")
    ax.set_ylabel("share right (held-out reference cells)")
    ax.legend(fontsize=8, loc="upper left")
    per = coverage[coverage["label"] != "all"]
    bx.barh(range(len(per)), per["coverage"], color="#4C72B0")
    bx.axvline(1 - alpha, color="#C44E52", lw=1.2)
    bx.set_yticks(range(len(per)), [f"{lab} ({n})" for lab, n in zip(per["label"], per["n_cells"])], fontsize=8)
    bx.set_xlim(0, 1)
    bx.set_xlabel("coverage of the prediction sets")
    bx.set_title(f"red: 1 - alpha = {1 - alpha:g}", fontsize=9)
    cx.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    if left_out is not None and len(left_out):
        for label, new in left_out.groupby("label", observed=True, sort=True):
            known = crossed[crossed["label"].astype(str) != str(label)]
            y = np.r_[np.ones(len(new)), np.zeros(len(known))]
            score = -np.r_[new["typicality"].to_numpy(), known["typicality"].to_numpy()]
            if len(new) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, score)
            cx.plot(fpr, tpr, lw=1, label=f"{label} ({roc_auc_score(y, score):.2f})")
        cx.legend(fontsize=6, loc="lower right", title="left out (AUROC)", title_fontsize=7)
    else:
        cx.text(0.5, 0.5, "no leave-one-type-out check\nfor the classifier", ha="center", va="center", fontsize=8)
    cx.set_xlabel("other types' cells flagged")
    cx.set_ylabel("left-out type's cells flagged")
    cx.set_title("each type left out: 1 - typicality", fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
