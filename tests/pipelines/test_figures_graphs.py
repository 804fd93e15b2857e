"""Graph figures (issue #11): the result-table bars and embedding projections on synthetic inputs,
and the three graph self-supervision pipelines on their embedded SBM defaults (tiny settings)
writing PNGs that exist, decode, have the documented size, are not blank, show one colour per
class and whose captions agree with metrics.json."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from threefold.datasets.errors import DataFormatError  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_graphs import plot_embeddings, plot_method_table  # noqa: E402
from figure_checks import assert_not_blank, decode  # noqa: E402

TAB10 = np.array([[0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.173, 0.627, 0.173], [0.839, 0.153, 0.157]])


def has_colour(img: np.ndarray, rgb, tol: float = 0.02) -> bool:
    return bool((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).any())


def table_shape(n_metrics: int) -> tuple[int, int]:
    cols = min(4, n_metrics)
    return 300 * math.ceil(n_metrics / cols), 320 * cols


def test_method_table_bars(tmp_path):
    tables = {"node/acc": {"a": {"mean": 0.8, "std": 0.05, "n": 3}, "b": {"mean": 0.6, "std": 0.0, "n": 3}},
              "link/auc": {"a": {"mean": 0.9, "std": 0.01, "n": 3}},
              "x": {}, "y": {"b": {"mean": 0.5, "std": 0.1, "n": 3}}, "z": {"a": {"mean": 0.1, "std": 0.1, "n": 3}},
              "w": {"a": {"mean": 0.2, "std": 0.1, "n": 3}}}  # fmt: skip
    path = plot_method_table(tmp_path / "t.png", tables)
    img = decode(path)
    assert img.shape[:2] == table_shape(5)  # the empty table "x" gets no panel
    assert_not_blank(img, path)
    assert has_colour(img, TAB10[0]) and has_colour(img, TAB10[1]) and not has_colour(img, TAB10[2])
    assert png_caption(path).startswith("Mean ± std over 3 seeds: node/acc: a 0.8000 ± 0.0500, b 0.6000 ± 0.0000;")
    with pytest.raises(DataFormatError, match="empty result tables"):
        plot_method_table(tmp_path / "e.png", {"x": {}})


def test_embeddings_pca_and_tsne(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    z = rng.normal(size=(60, 6)) + 8 * np.eye(6)[y]
    paths = plot_embeddings(tmp_path, z, y, "toy embedding", seed=1)
    assert [p.name for p in paths] == ["embedding_pca.png", "embedding_tsne.png"]
    for p in paths:
        img = decode(p)
        assert img.shape[:2] == (450, 500)
        assert_not_blank(img, p)
        assert all(has_colour(img, c) for c in TAB10[:3]) and not has_colour(img, TAB10[3])
    assert png_caption(paths[1]) == "t-SNE of the toy embedding, coloured by class."


TINY_ISOC = ["num_seeds=2", "trainer.max_epochs=2", "model.hidden=[16,16]", "baselines.vgae_epochs=5", "baselines.gcn_epochs=5"]


@pytest.mark.parametrize("name, args, classes", [
    ("planetoid-isocvgae", TINY_ISOC, 3),
    ("tu-isocvgae", [*TINY_ISOC, "folds=3", "supervised_epochs=3"], 2),
    ("planetoid-selftask", ["num_seeds=2", "trainer.max_epochs=3"], 3),
])  # fmt: skip
def test_graph_pipelines_write_their_figures(tmp_path, monkeypatch, name, args, classes):
    from threefold.pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("THREEFOLD_RUN_DIR", raising=False)
    assert main(["run", name, *args]) == 0
    (run,) = (tmp_path / "runs" / name).iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    figs = run / "figures"
    assert sorted(p.name for p in figs.glob("*.png")) == ["curves.png", "embedding_pca.png", "embedding_tsne.png",
                                                           "results.png"]
    report = (run / "report.md").read_text()
    for png in figs.glob("*.png"):
        img = decode(png)
        assert_not_blank(img, png)
        assert f"(figures/{png.name})" in report
    assert decode(figs / "results.png").shape[:2] == table_shape(len(metrics["tables"]))
    for emb in ("embedding_pca.png", "embedding_tsne.png"):
        img = decode(figs / emb)
        assert img.shape[:2] == (450, 500)
        assert all(has_colour(img, c) for c in TAB10[:classes]) and not has_colour(img, TAB10[classes])
    caption = png_caption(figs / "results.png")
    for metric, row in metrics["tables"].items():
        for method, cell in row.items():
            assert re.search(re.escape(f"{method} {cell['mean']:.4f} ± {cell['std']:.4f}"), caption), (metric, method)
