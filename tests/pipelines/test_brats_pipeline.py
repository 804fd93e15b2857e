"""brats-multilevel / -softmax / -sigmoid end to end on the embedded phantoms (small budget, looser
thresholds than the documented run), prediction files, patch sampling and the threshold baseline.

Figures (issue #11): the three pipelines share ``_BratsPipeline.figures``; each run here checks with
:func:`check_brats_figures` that the slice with WT / TC / ET contours and the Dice / HD95 bars exist,
decode, have the documented size, are not blank, that the bars' caption carries metrics.json's values
and that report.md links every PNG."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from threefold.datasets.brain_phantoms import write_brats2018_phantoms  # noqa: E402
from threefold.medical.segmentation.threshold import apply_region_thresholds, fit_region_thresholds  # noqa: E402
from threefold.pipelines.brats import PatchConfig, PatchDataset  # noqa: E402
from threefold.pipelines.cli import main  # noqa: E402

SMALL = [
    "phantom.cases=10",
    "phantom.shape=[40,40,40]",
    "patch.size=[24,24,24]",
    "patch.per_epoch=32",
    "model.base_filters=6",
    "trainer.max_epochs=6",
    "trainer.accelerator=cpu",
]


def _run(tmp_path: Path, pipeline: str, extra: list[str]) -> Path:
    assert main(["run", pipeline, "--runs-dir", str(tmp_path / "runs"), *SMALL, *extra]) == 0
    (run,) = (tmp_path / "runs" / pipeline).iterdir()
    return run


def check_brats_figures(run: Path, metrics: dict) -> None:
    pytest.importorskip("matplotlib")
    from figure_checks import check_run_figures

    from threefold.pipelines.figures import png_caption

    # 100 dpi: slice 9 x (2 x 3.2) in (FLAIR row, T1ce row); bars: 2 families (Dice, HD95) x max(4, 0.45 * 3 + 1.5) in x 3.6 in
    expected = {"slice_case0.png": (640, 900), "per_class.png": (360, 800)}
    figs = run / "figures"
    check_run_figures(figs, (run / "report.md").read_text(), expected)
    caption = png_caption(figs / "per_class.png")
    for region in ("WT", "TC", "ET"):
        assert f"{region} {metrics[f'Dice/{region}']:.3f}" in caption, (region, caption)
    slice_caption = png_caption(figs / "slice_case0.png")
    assert "WT green, TC orange, ET red" in slice_caption and "FLAIR and T1ce" in slice_caption


@pytest.mark.slow
def test_multilevel_trains_nested_and_writes_submission(tmp_path):
    torch.set_num_threads(1)
    run = _run(tmp_path, "brats-multilevel", ["optim.lr=0.01"])
    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader(open(run / "cases.csv")))
    assert len(rows) == metrics["test_cases"] == 2
    # the accumulator's means agree with the per-case rows (computed independently per case)
    for region in ("WT", "TC", "ET"):
        assert metrics[f"Dice/{region}/mean"] == pytest.approx(np.mean([float(r[f"Dice/{region}"]) for r in rows]))
        assert metrics[f"Dice/{region}"] == pytest.approx(metrics[f"Dice/{region}/mean"], abs=1e-6)
        assert metrics[f"HD95[max-directed]/{region}"] == pytest.approx(
            metrics[f"HD95[max-directed]/{region}/mean"], rel=1e-6
        )
    assert metrics["nesting_violations/total"] == 0
    # CI budget (96 steps of 24³ patches, seed 0 gives WT 0.60 / TC 0.70 / ET 0.69 on 2 held-out
    # cases); the documented run of docs/glioma.md meets the full thresholds
    dices = {r: metrics[f"Dice/{r}/mean"] for r in ("WT", "TC", "ET")}
    assert dices["WT"] > 0.45 and dices["TC"] > 0.5 and dices["ET"] > 0.5, dices
    for region in ("TC", "ET"):
        assert dices[region] > metrics[f"threshold_baseline/Dice/{region}/mean"] + 0.1
    assert metrics["threshold_baseline/nesting_violations/total"] > 0  # the baseline is not nested
    check_brats_figures(run, metrics)
    assert (run / "figures" / "curves.png").is_file()

    ckpt = run / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)
    # `threefold eval` regenerates the same phantoms and split from the stored config
    assert main(["eval", "brats-multilevel", "--checkpoint", str(ckpt), "--runs-dir", str(tmp_path / "eval")]) == 0
    (eval_run,) = (tmp_path / "eval" / "brats-multilevel-eval").iterdir()
    again = json.loads((eval_run / "metrics.json").read_text())
    assert again["Dice/ET/mean"] == pytest.approx(metrics["Dice/ET/mean"], abs=1e-6)
    cases = tmp_path / "cases"
    write_brats2018_phantoms(cases, 2, seed=5, shape=(40, 40, 40))
    out = tmp_path / "pred"
    assert main(["predict", "brats-multilevel", "--checkpoint", str(ckpt), "--input", str(cases), "--out", str(out)]) == 0
    for case in ("Brats18_Phantom_000", "Brats18_Phantom_001"):
        ref = nib.load(str(cases / case / f"{case}_flair.nii.gz"))
        pred = nib.load(str(out / f"{case}.nii.gz"))
        np.testing.assert_allclose(pred.affine, ref.affine)
        assert pred.shape == ref.shape
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        assert values <= {0, 1, 2, 4} and 2 in values  # oedema is found in every phantom
    # the same images in the BraTS 2023 layout come back in that layout's label values
    case = "Brats18_Phantom_000"
    gli = tmp_path / "gli" / "BraTS-GLI-00000-000"
    gli.mkdir(parents=True)
    for old, new in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
        shutil.copy(cases / case / f"{case}_{old}.nii.gz", gli / f"{gli.name}-{new}.nii.gz")
    assert main(["predict", "brats-multilevel", "--checkpoint", str(ckpt), "--input", str(tmp_path / "gli"), "--out", str(out / "gli")]) == 0
    p2018 = np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj)
    p2023 = np.asarray(nib.load(str(out / "gli" / f"{gli.name}.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.where(p2018 == 4, 3, p2018), p2023)  # 4 (2018 ET) is 3 in 2023


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["brats-softmax", "brats-sigmoid"])
def test_baseline_pipelines_report_nesting(tmp_path, pipeline):
    torch.set_num_threads(1)
    run = _run(tmp_path, pipeline, ["trainer.max_steps=2", "phantom.cases=5"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert "nesting_violations/total" in metrics and "Dice/ET/median" in metrics
    if pipeline == "brats-softmax":  # one class per voxel: nested by construction
        assert metrics["nesting_violations/total"] == 0
    check_brats_figures(run, metrics)


def test_head_is_fixed_by_pipeline(tmp_path, capsys):
    assert main(["run", "brats-sigmoid", "--runs-dir", str(tmp_path), "head=softmax"]) == 2
    assert "brats-sigmoid uses head=sigmoid" in capsys.readouterr().err


class _Cases(list):
    pass


def test_patch_sampling_deterministic_foreground_and_aligned():
    rng = np.random.default_rng(0)
    label = np.zeros((20, 18, 16), np.uint8)
    label[12:16, 3:7, 10:14] = rng.integers(1, 4, (4, 4, 4))
    image = np.repeat((label.astype(np.float32) + 1.0)[None], 4, 0)
    cases = _Cases([{"image": image, "label": label}])
    ds = PatchDataset(cases, PatchConfig(size=[8, 8, 8], per_epoch=200, foreground_fraction=1.0), seed=3)
    a, b = ds[7], ds[7]
    np.testing.assert_array_equal(a["image"], b["image"])
    ds.epoch = 1
    assert not np.array_equal(ds[7]["image"], a["image"])
    for i in range(50):
        item = ds[i]
        assert item["label"].shape == (8, 8, 8) and item["label"].max() > 0  # centred on tumour
        # flips / rotations move image and label together; intensity scale/shift keep round(x) - 1
        inside = item["image"][0] != 0
        np.testing.assert_array_equal(np.round(item["image"][0][inside]) - 1, item["label"][inside])
    none = PatchDataset(cases, PatchConfig(size=[8, 8, 8], per_epoch=400, foreground_fraction=0.0, augment=False), seed=0)
    frac = np.mean([none[i]["label"].max() > 0 for i in range(400)])
    # uniform centres: P(patch touches the 4³ lesion) = prod over axes of overlap ranges / sizes
    expected = (11 / 20) * (11 / 18) * (11 / 16)
    assert abs(frac - expected) < 0.08


def test_threshold_baseline_matches_brute_force():
    rng = np.random.default_rng(1)
    images, labels = [], []
    for _ in range(3):
        y = rng.integers(0, 4, (6, 6, 6)).astype(np.uint8)
        im = rng.normal(size=(2, 6, 6, 6)).astype(np.float32) + y[None] * np.array([1.0, -0.5])[:, None, None, None]
        images.append(im)
        labels.append(y)
    rules = fit_region_thresholds(images, labels, channels=[0, 1], n_candidates=50)
    for level, rule in zip((1, 2, 3), rules):
        best = -1.0
        for ch in (0, 1):
            cands = np.quantile(np.concatenate([im[ch].ravel() for im in images]), np.linspace(0, 1, 50))
            for sign in (1, -1):
                for th in cands:
                    ds = []
                    for im, y in zip(images, labels):
                        p, t = sign * im[ch] > sign * th, y >= level
                        ds.append(2 * np.sum(p & t) / (p.sum() + t.sum()) if p.sum() + t.sum() else 1.0)
                    best = max(best, float(np.mean(ds)))
        assert rule.train_dice == pytest.approx(best, abs=1e-9)
    masks = apply_region_thresholds(images[0], rules)
    assert masks.shape == (3, 6, 6, 6) and masks.dtype == bool
