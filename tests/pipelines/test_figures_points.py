"""Point-cloud figures (issue #11): the plotting functions on synthetic clouds and depth maps, and the
Point-MAE pipelines on their embedded default (CI-size overrides) writing PNGs that exist, decode,
have the documented size, are not blank, and whose captions agree with metrics.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from threefold.datasets.errors import ConfigError, DataFormatError  # noqa: E402
from threefold.pipelines.figures import png_caption  # noqa: E402
from threefold.pipelines.figures_points import (  # noqa: E402
    MASKED_COLOUR,
    VISIBLE_COLOUR,
    plot_depth_views,
    plot_point_reconstructions,
)
from figure_checks import assert_not_blank, decode  # noqa: E402


def has_colour(img: np.ndarray, rgb, tol: float = 0.03) -> bool:
    return bool((np.abs(img[..., :3] - np.asarray(rgb)).max(-1) < tol).any())


def sphere(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_reconstruction_rows_size_and_colours(tmp_path):
    clouds = [sphere(600, s) for s in range(2)]
    vis = [c[c[:, 0] < 0] for c in clouds]
    gt = [c[c[:, 0] >= 0] for c in clouds]
    pred = [g + 0.05 for g in gt]
    path = plot_point_reconstructions(tmp_path / "rec.png", vis, pred, gt, names=["a", "b"])
    img = decode(path)
    assert img.shape[:2] == (600, 900)  # 2 rows x 3 cells of 300 px
    assert_not_blank(img, path)
    assert has_colour(img, VISIBLE_COLOUR) and has_colour(img, MASKED_COLOUR)
    # the masked-input column shows no masked (orange) point
    assert not has_colour(img[:, :300], MASKED_COLOUR) and has_colour(img[:, 300:600], MASKED_COLOUR)
    with pytest.raises(ConfigError, match="same number"):
        plot_point_reconstructions(tmp_path / "bad.png", vis, pred[:1], gt)
    with pytest.raises(DataFormatError, match=r"predicted\[0\].*expected \(N, 3\)"):
        plot_point_reconstructions(tmp_path / "bad.png", vis, [p[:, :2] for p in pred], gt)


def test_depth_views_with_and_without_saliency(tmp_path):
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 18**2).astype(float)
    depth = np.stack([disc * (1 + 0.02 * xx), disc * (1 + 0.02 * yy), disc * 1.5])
    sal = np.stack([np.exp(-((yy - 20) ** 2 + (xx - c) ** 2) / 50.0) for c in (10, 24, 38)])
    (with_sal,) = plot_depth_views(tmp_path, depth, sal, name="i2p")
    assert with_sal == tmp_path / "figures" / "i2p.png"
    (only,) = plot_depth_views(tmp_path / "figures", depth, None, name="depth_only")
    assert only.parent == tmp_path / "figures"
    for path, shape in ((with_sal, (600, 900)), (only, (300, 900))):
        img = decode(path)
        assert img.shape[:2] == shape
        assert_not_blank(img, path)
    assert "saliency" in png_caption(with_sal) and "saliency" not in png_caption(only)
    with pytest.raises(DataFormatError, match="expected the depth maps' shape"):
        plot_depth_views(tmp_path, depth, sal[:, :10])
    with pytest.raises(DataFormatError, match=r"expected \(3, H, W\)"):
        plot_depth_views(tmp_path, depth[:2])


MODEL = ["model.num_group=8", "model.group_size=16", "model.dim=24", "model.depth=1", "model.heads=2",
         "model.embed_width=8"]
SMALL = ["num_points=256", "sample.train_per_class=2", "sample.test_per_class=1", "sample.points=512",
         "trainer.num_workers=0", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "trainer.log_every_n_steps=1", *MODEL]


def run(pipeline: str, *args: str) -> Path:
    from threefold.pipelines.cli import main

    assert main(["run", pipeline, *SMALL, *args]) == 0
    return sorted((Path("runs") / pipeline).iterdir())[-1]


def check_pngs(run_dir: Path, expected: dict[str, tuple[int, int]]) -> None:
    figs = run_dir / "figures"
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(expected)
    for name, shape in expected.items():
        img = decode(figs / name)
        if name == "curves.png":  # 400 x 320 px per logged metric family, at most 3 a row
            assert img.shape[0] % 320 == 0 and img.shape[1] % 400 == 0, img.shape
        else:
            assert img.shape[:2] == shape, (name, img.shape)
        assert_not_blank(img, figs / name)
    report = (run_dir / "report.md").read_text()
    for name in expected:
        assert f"(figures/{name})" in report


def caption_numbers(path: Path) -> tuple[float, float]:
    m = re.search(r"mean over present classes ([0-9.]+), overall ([0-9.]+)", png_caption(path))
    assert m, png_caption(path)
    return float(m.group(1)), float(m.group(2))


def test_pointmae_pipelines_write_their_figures(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pre = run("shapenet-pointmae-pretrain", "model.decoder_depth=1", "model.decoder_heads=2", "trainer.max_epochs=2",
              "trainer.batch_size=8", "optim.warmup_epochs=1")
    cats = len({p.name.split("-")[0] for p in (pre / "data" / "shapenet55" / "shapenet_pc").glob("*.npy")})
    rows = min(4, cats)
    check_pngs(pre, {"curves.png": (320, 800), "reconstructions.png": (300 * rows, 900)})
    caption = png_caption(pre / "figures" / "reconstructions.png")
    assert caption.count("CD-L2") == rows + 1

    ckpt = pre / "checkpoints" / "last.ckpt"
    ft = run("modelnet40-pointmae-finetune", f"pretrained={ckpt}", "trainer.max_epochs=1", "trainer.batch_size=8",
             "oversample=300")
    metrics = json.loads((ft / "metrics.json").read_text())
    with open(ft / "data" / "modelnet40" / "modelnet40_shape_names.txt") as f:
        classes = len(f.read().split())
    side = int(100 * min(12.0, max(4.5, 0.5 * classes + 2.5)))
    bars_width = int(100 * max(4.0, 0.45 * classes + 1.5))
    check_pngs(ft, {"curves.png": (320, 800), "per_class_accuracy.png": (360, bars_width),
                    "confusion_matrix.png": (side, side)})
    mean, overall = caption_numbers(ft / "figures" / "per_class_accuracy.png")
    assert mean == pytest.approx(metrics["test_mean_class_acc"], abs=1e-4)
    assert overall == pytest.approx(metrics["test_acc"], abs=1e-4)

    svm = run("modelnet40-pointmae-svm", f"pretrained={ckpt}")
    metrics = json.loads((svm / "metrics.json").read_text())
    check_pngs(svm, {"per_class_accuracy.png": (360, bars_width), "confusion_matrix.png": (side, side),
                     "embedding_pca.png": (450, 500)})
    _, overall = caption_numbers(svm / "figures" / "per_class_accuracy.png")
    assert overall == pytest.approx(metrics["svm_acc"], abs=1e-4)
