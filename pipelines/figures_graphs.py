"""Graph figures (issue #11): node or graph embeddings projected by PCA and t-SNE and coloured by
class (the picture of graph representation learning papers, e.g. Kipf & Welling 2016 VGAE, IsoC-VGAE,
SelfTask-GNN), and the mean ± std result table over seeds as a bar chart (one panel per metric,
one bar per method).

Pure plotting on top of :func:`threefold.pipelines.figures.plot_embedding` and
:func:`~threefold.pipelines.figures.plot_per_class`: arrays in, PNG paths out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from threefold.datasets.errors import DataFormatError
from threefold.pipelines.figures import _class_colours, new_figure, plot_embedding, save_figure


def plot_embeddings(
    fig_dir: Path,
    embedding: np.ndarray,
    labels: np.ndarray,
    what: str,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    methods: Sequence[str] = ("pca", "tsne"),
) -> list[Path]:
    """``fig_dir/embedding_<method>.png`` for each projection of the (N, D) embedding, coloured by
    the (N,) int labels; ``what`` names the embedding in the captions (e.g. "IsoC-VGAE encoder,
    seed 0, all 2708 nodes"). t-SNE is seeded by ``seed``. 500 × 450 px each."""
    names = {"pca": "PCA", "tsne": "t-SNE"}
    return [
        plot_embedding(embedding, labels, Path(fig_dir) / f"embedding_{m}.png", m, seed=seed, class_names=class_names,
                       caption=f"{names.get(m, m)} of the {what}, coloured by class.")
        for m in methods
    ]


TABLE_PANEL_INCHES = (3.2, 3.0)
TABLE_COLUMNS = 4


def plot_method_table(
    out: Path, tables: Mapping[str, Mapping[str, Mapping[str, float]]], caption: str | None = None
) -> Path:
    """``tables[metric][method] = {"mean", "std", "n"}`` (the graph pipelines' result tables) as bars:
    one 320 × 300 px panel per metric (four a row), one bar per method with ± std over seeds and its
    mean written on it. Methods keep one colour across panels."""
    metrics = [k for k, row in tables.items() if row]
    if not metrics:
        raise DataFormatError("plot_method_table: empty result tables")
    methods = sorted({m for k in metrics for m in tables[k]})
    colours = dict(zip(methods, _class_colours(len(methods))))
    cols = min(TABLE_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = new_figure((TABLE_PANEL_INCHES[0] * cols, TABLE_PANEL_INCHES[1] * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics):
        row = tables[metric]
        names = [m for m in methods if m in row]
        mean = np.array([row[m]["mean"] for m in names], dtype=np.float64)
        std = np.array([row[m]["std"] for m in names], dtype=np.float64)
        bars = ax.bar(np.arange(len(names)), mean, yerr=std, capsize=3, color=[colours[m] for m in names])
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in mean], fontsize="x-small")
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize="small")
        if mean.size and mean.min() >= 0 and (mean + std).max() <= 1:
            ax.set_ylim(0, 1.08)
        ax.set_title(metric, fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    seeds = sorted({int(c["n"]) for k in metrics for c in tables[k].values()})
    caption = caption or (f"Mean ± std over {'/'.join(map(str, seeds))} seeds: " + "; ".join(
        f"{k}: " + ", ".join(f"{m} {c['mean']:.4f} ± {c['std']:.4f}" for m, c in tables[k].items()) for k in metrics))
    return save_figure(fig, out, caption)
