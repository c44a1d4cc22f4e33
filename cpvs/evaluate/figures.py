"""Figures of the evaluation report (matplotlib, no display): per-class bars, heat maps,
t-SNE panels and image grids. Each function returns a figure; the report embeds it."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_per_class(per_class: pd.DataFrame, title: str):
    plt = _plt()
    d = per_class.sort_values("accuracy")
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(d) + 1))
    ax.barh(d["label"].astype(str), d["accuracy"], color="#4c78a8")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    return fig


def heatmap(matrix: pd.DataFrame, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * matrix.shape[1] + 2, 0.55 * matrix.shape[0] + 1.5))
    im = ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", vmin=-0.2, vmax=1, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=40, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = matrix.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="mean correlation")
    ax.set_title(title)
    return fig


def category_colour(i: int, n: int):
    """Colours that can be told apart: tab10's ten distinct hues first (resampling tab20 to a few
    categories gives pairs of light and dark of one hue); markers separate further tens."""
    plt = _plt()
    return plt.get_cmap("tab10")(i % 10) if n <= 10 else plt.get_cmap("tab20")(i % 20)


def embedding_plot(x: np.ndarray, colours: dict[str, pd.Series], seed: int = 0, title: str = "t-SNE of profiles"):
    """t-SNE of rows of ``x``, one panel per colouring."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _plt()
    x = np.nan_to_num((x - x.mean(0)) / (x.std(0) + 1e-9))
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))  # below the number of points, as TSNE requires
    z = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)
    fig, axes = plt.subplots(1, len(colours), figsize=(5.2 * len(colours), 4.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], colours.items()):
        cats = values.astype(str).to_numpy()
        uniq = sorted(dict.fromkeys(cats))
        for i, u in enumerate(uniq):
            m = cats == u
            ax.scatter(z[m, 0], z[m, 1], s=14, color=category_colour(i, len(uniq)), marker="os^Dv<>P"[(i // 10) % 8],
                       label=u[:28])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(uniq) <= 16:
            ax.legend(fontsize=6, loc="best", frameon=False)
    fig.suptitle(title)
    return fig


def image_grid(rows: list[tuple[str, list[np.ndarray]]], columns: list[str], title: str):
    """A grid of images: one row per kind (brightfield, truth, prediction, uncertainty), one column per channel."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.3 * len(rows)), squeeze=False)
    # Channel titles go on the first full row: over the lone brightfield image they would misname it.
    title_row = next((r for r, (_, images) in enumerate(rows) if all(i is not None for i in images)), 0)
    for r, (name, images) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r][c]
            if img is None:  # e.g. brightfield has one image for the whole row
                ax.axis("off")
                continue
            lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1), cmap="magma" if "uncert" in name else "gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == title_row:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig
