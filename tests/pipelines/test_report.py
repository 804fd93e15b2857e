"""Figures and reports (issue #11).

`planetoid-gcn` on its embedded default through the CLI writes PNGs that exist, decode, have the sizes
the layout promises and are not blank, with the per-class accuracy of its caption checked against
scikit-learn on the saved checkpoints; every link and image of report.md / report.html resolves;
`threefold report` regenerates, and says so when matplotlib is missing. The shared helpers are
checked against independent references (NumPy SVD, scikit-learn, hand-written Lightning CSV,
PNG text chunks written by Pillow)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from threefold.datasets.errors import DataFormatError  # noqa: E402
from threefold.pipelines import figures as F  # noqa: E402

CLI = [sys.executable, "-m", "threefold.pipelines.cli"]
TAB10 = np.array([[0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.173, 0.627, 0.173], [0.839, 0.153, 0.157]])


def decode(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)  # (H, W, 4) float32 in [0, 1] for PNG


def assert_not_blank(img: np.ndarray, path: Path) -> None:
    gray = img[..., :3].mean(-1)
    # A blank (one-colour) figure has variance 0; drawn axes, text and data leave well over 1e-3.
    assert gray.var() > 2e-3, f"{path} looks blank (variance {gray.var():.2e})"
    assert (gray < 0.9).mean() > 0.01, f"{path}: under 1% of the pixels are drawn"


def has_colour(img: np.ndarray, rgb: np.ndarray, tol: float = 0.02) -> bool:
    return bool((np.abs(img[..., :3] - rgb).max(-1) < tol).any())


@pytest.fixture(scope="module")
def gcn_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("report")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("THREEFOLD_RUN_DIR", None)
    out = subprocess.run([*CLI, "run", "planetoid-gcn", "num_seeds=2", "trainer.max_epochs=10"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (cwd / "runs" / "planetoid-gcn").iterdir()
    assert f"report: {run / 'report.html'}" in out.stdout
    return run


# Sizes follow from the documented layout at 100 dpi: curve panels 400 x 320 px (here the families
# `acc` and `loss`), the embedding 500 x 450, a bar panel at least 400 x 360, a 4-class confusion
# matrix 4.5 in square.
EXPECTED = {
    "curves.png": (320, 800),
    "embedding_pca.png": (450, 500),
    "per_class_accuracy.png": (360, 400),
    "confusion_matrix.png": (450, 450),
}


def test_planetoid_gcn_figures_exist_decode_and_are_not_blank(gcn_run):
    figs = gcn_run / "figures"
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(EXPECTED)
    for name, (h, w) in EXPECTED.items():
        img = decode(figs / name)
        assert img.shape[:2] == (h, w), (name, img.shape)
        assert_not_blank(img, figs / name)
    # one colour per seed in the curves, one per karate-club community in the embedding
    curves = decode(figs / "curves.png")
    assert has_colour(curves, TAB10[0]) and has_colour(curves, TAB10[1]) and not has_colour(curves, TAB10[2])
    emb = decode(figs / "embedding_pca.png")
    assert all(has_colour(emb, c) for c in TAB10)


def test_per_class_accuracy_matches_sklearn_on_the_checkpoints(gcn_run):
    from sklearn.metrics import recall_score

    from threefold.pipelines import load
    from threefold.pipelines.planetoid_gcn import karate_club

    graph = karate_club()
    y = graph.y[graph.test_mask].numpy()
    recalls = []
    for seed in (0, 1):
        pred = load("planetoid-gcn", gcn_run / f"seed{seed}" / "checkpoints" / "last.ckpt").predict(graph)
        recalls.append(recall_score(y, pred[graph.test_mask].numpy(), labels=[0, 1, 2, 3], average=None,
                                    zero_division=np.nan))
    recalls = np.array(recalls)
    caption = F.png_caption(gcn_run / "figures" / "per_class_accuracy.png")
    found = re.findall(r"class (\d) ([0-9.]+) ± ([0-9.]+)", caption)
    assert [int(c) for c, _, _ in found] == [0, 1, 2, 3], caption
    np.testing.assert_allclose([float(m) for _, m, _ in found], recalls.mean(0), atol=1e-4)
    np.testing.assert_allclose([float(s) for _, _, s in found], recalls.std(0), atol=1e-4)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.href: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.src.append(a["src"])
        if tag == "a" and "href" in a:
            self.href.append(a["href"])


def test_report_links_resolve_and_show_metrics_and_config(gcn_run):
    pngs = {p.relative_to(gcn_run).as_posix(): p.read_bytes() for p in (gcn_run / "figures").glob("*.png")}
    links = _Links()
    page = (gcn_run / "report.html").read_text()
    links.feed(page)
    assert sorted(unquote(h) for h in links.href) == sorted(pngs)
    assert all((gcn_run / unquote(h)).is_file() for h in links.href)
    embedded = []
    for src in links.src:
        assert src.startswith("data:image/png;base64,"), src[:60]
        embedded.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    assert sorted(embedded) == sorted(pngs.values())  # self-contained: the exact PNG bytes

    md = (gcn_run / "report.md").read_text()
    targets = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(([^)\s]+)\)", md)
    assert sorted(unquote(t) for t in targets) == sorted(pngs)
    assert all((gcn_run / unquote(t)).is_file() for t in targets)

    metrics = json.loads((gcn_run / "metrics.json").read_text())
    value = f"{metrics['test_acc_mean']:.6g}"
    for text in (md, page):
        assert "test_acc_mean" in text and value in text
        assert F.png_caption(gcn_run / "figures" / "embedding_pca.png") in text
    assert (gcn_run / "config.yaml").read_text().strip() in md


def test_report_verb_regenerates_and_notes_missing_matplotlib(gcn_run, tmp_path, monkeypatch):
    from threefold.pipelines.cli import main

    run = tmp_path / "planetoid-gcn" / gcn_run.name
    shutil.copytree(gcn_run, run)
    (run / "report.html").unlink()
    (run / "figures" / "embedding_pca.png").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert (decode(run / "figures" / "embedding_pca.png") == decode(gcn_run / "figures" / "embedding_pca.png")).all()

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    (run / "figures" / "curves.png").unlink()
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "figures skipped" in md and "threefold[viz]" in md
    assert not (run / "figures" / "curves.png").exists()

    assert main(["report", str(tmp_path / "nothing-here")]) == 1  # no metrics.json: one-line error


# ---- the shared helpers ------------------------------------------------------------------------


def write_lightning_csv(path: Path) -> None:
    """The layout Lightning's CSVLogger writes: a header of every key, one row per logging call
    holding only the keys logged then."""
    path.parent.mkdir(parents=True)
    path.write_text(
        "epoch,step,lr-Adam,test_acc,train_loss,train_miou_epoch,train_miou_step,val/loss,val_acc\n"
        "0,0,0.01,,1.5,,0.20,,\n"
        "0,0,,,,0.25,,1.4,0.5\n"
        "1,1,0.005,,1.2,,0.35,,\n"
        "1,1,,,,0.40,,1.1,0.6\n"
        "1,1,,0.7,,,,,\n"
    )


def test_lightning_csv_and_curve_families(tmp_path):
    csv_path = tmp_path / "seed3" / "logs" / "metrics.csv"
    write_lightning_csv(csv_path)
    cols = F.read_lightning_csv(csv_path)
    np.testing.assert_array_equal(cols["train_loss"], [1.5, np.nan, 1.2, np.nan, np.nan])
    np.testing.assert_array_equal(cols["val_acc"], [np.nan, 0.5, np.nan, 0.6, np.nan])
    assert F.curve_families(list(cols)) == {
        "lr-Adam": {"lr-Adam": "lr-Adam"},
        "loss": {"train": "train_loss", "val": "val/loss"},
        "miou": {"train per epoch": "train_miou_epoch", "train per step": "train_miou_step"},
        "acc": {"val": "val_acc"},
    }
    assert F.lightning_logs(tmp_path) == [("seed3", csv_path)]
    path = F.plot_training_curves([csv_path], tmp_path / "curves.png", labels=["seed3"])
    img = decode(path)
    assert img.shape[:2] == (640, 1200) and has_colour(img, TAB10[0])  # 4 families: 3 panels a row, 2 rows
    assert_not_blank(img, path)

    bad = tmp_path / "bad" / "logs" / "metrics.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("epoch,step,train_loss\n0,0,1.0\n0,1,oops\n")
    with pytest.raises(DataFormatError, match=r"metrics.csv:3: column 'train_loss' holds 'oops'"):
        F.read_lightning_csv(bad)


def test_pca_projection_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:2].T
    got = F.project_embedding(x, "pca")
    signs = np.sign((got * ref).sum(0))  # principal axes are defined up to sign
    np.testing.assert_allclose(got * signs, ref, atol=1e-10)


def test_tsne_is_seeded_and_keeps_separated_clusters_apart():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 12)
    x = rng.normal(size=(36, 8)) + 20.0 * np.eye(8)[labels]
    a, b = F.project_embedding(x, "tsne", seed=3), F.project_embedding(x, "tsne", seed=3)
    np.testing.assert_array_equal(a, b)
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()  # every point's 2-D nearest neighbour is in its cluster


def test_confusion_matrix_rates_match_sklearn(tmp_path):
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    counts = confusion_matrix(y, p, labels=range(4))
    reference = confusion_matrix(y, p, labels=range(4), normalize="true")
    np.testing.assert_allclose(F.normalized_confusion(counts), reference)
    counts[2] = 0  # a class without samples: undefined row, not zeros
    rates = F.normalized_confusion(counts)
    assert np.isnan(rates[2]).all() and np.isfinite(np.delete(rates, 2, 0)).all()
    img = decode(F.plot_confusion_matrix(counts, tmp_path / "cm.png", ["a", "b", "c", "d"]))
    assert img.shape[:2] == (450, 450)
    assert_not_blank(img, tmp_path / "cm.png")
    with pytest.raises(DataFormatError, match=r"expected \(C, C\)"):
        F.normalized_confusion(np.zeros((3, 4)))


def test_per_class_entries_from_the_segmentation_accumulator(tmp_path):
    import torch
    from sklearn.metrics import jaccard_score

    from threefold.pipelines.metrics import SemanticSegmentationMetrics

    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    acc = SemanticSegmentationMetrics(3, class_names=["road", "car", "tree"])
    acc.update(torch.from_numpy(p), torch.from_numpy(y))
    metrics = {k: float(v) for k, v in acc.compute().items()}
    metrics["Dice/WT"] = None  # NaN as write_metrics stores it
    entries = F.per_class_entries(metrics)
    assert list(entries) == ["IoU", "Dice"] and math.isnan(entries["Dice"]["WT"])
    np.testing.assert_allclose([entries["IoU"][c] for c in ("road", "car", "tree")],
                               jaccard_score(y, p, average=None, labels=[0, 1, 2]))

    run = tmp_path / "run"
    run.mkdir()
    (path,) = F.default_figures(run, metrics)  # no Lightning log: no curves, only the bar chart
    assert path == run / "figures" / "per_class.png"
    img = decode(path)
    assert img.shape[:2] == (360, 800)  # two 400 px panels (3 and 1 classes)
    assert_not_blank(img, path)
    assert "WT n/a" in F.png_caption(path)


def test_png_caption_reads_text_chunks_written_by_pillow(tmp_path):
    from PIL import Image, PngImagePlugin

    for kind, text in (("tEXt", "IoU per class (latin-1: ±)"), ("zTXt", "compressed caption"),
                       ("iTXt", "Dice → WT, TC, ET")):
        info = PngImagePlugin.PngInfo()
        if kind == "iTXt":
            info.add_itxt("Description", text, zip=True)
        else:
            info.add_text("Description", text, zip=kind == "zTXt")
        path = tmp_path / f"{kind}.png"
        Image.new("RGB", (4, 4)).save(path, pnginfo=info)
        assert F.png_caption(path) == text
    Image.new("RGB", (4, 4)).save(tmp_path / "none.png")
    assert F.png_caption(tmp_path / "none.png") is None
    (tmp_path / "fake.png").write_bytes(b"GIF89a")
    with pytest.raises(DataFormatError, match="not a PNG"):
        F.png_caption(tmp_path / "fake.png")


def test_save_image_keeps_pixels_and_caption(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = F.save_image(rgb, tmp_path / "render.png", "offscreen render → convexes")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)  # PNG is lossless
    assert F.png_caption(path) == "offscreen render → convexes"
    path = F.save_image(Image.fromarray(rgb), tmp_path / "grid.png", "molecule grid")
    assert F.png_caption(path) == "molecule grid"
    with pytest.raises(DataFormatError, match=r"expected \(H, W, 3\|4\) uint8"):
        F.save_image(rgb.astype(np.float32), tmp_path / "bad.png", "x")
