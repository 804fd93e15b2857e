"""semantickitti-rapidseg / semantickitti-minkunet: the CI training run (reduced-width R-RAPiD-Seg on
the synthetic sample, val mIoU[absent=skip] >= 0.70), submission files, `threefold predict` on a root
and on one .bin, and the data pieces (collate, class weights, deterministic augmentation).

Figures (issue #11): both pipelines share ``_RapidSegPipeline.figures``; the MinkUNet run (fast) and
the slow CI R-RAPiD-Seg run on the embedded synthetic sample check the PNGs of the first val scan
(bird's-eye / range views, confusion matrix) and the per-class IoU bars: they exist, decode, have the
documented size, are not blank, carry the official colour of the ground-truth classes, state the
point accuracy counted here from the submission file, and report.md links every one of them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("spconv")

from threefold.pipelines.cli import main  # noqa: E402
from threefold.pipelines.rapidseg import (  # noqa: E402
    AugmentConfig,
    ScanDataset,
    class_weights,
    collate_scans,
)

# Reduced CI model (config overrides, not code): ~20k-point scans, 0.2 m voxels, quarter-width
# MinkUNet34, VSA / autoencoder with l = 4, d = 16, d' = 4; AdamW instead of the paper's 100-epoch SGD
CI = [
    "sample.azimuth_step_deg=1.0",
    "model.voxel_size=0.2",
    "model.width=0.25",
    "model.latents=4",
    "model.dim=16",
    "model.inner_dim=4",
    "model.stream_channels=16",
    "ae.epochs=1",
    "optim.name=adamw",
    "optim.lr=3e-3",
    "trainer.max_epochs=30",
    "trainer.accelerator=cpu",
]

# the official learning_map_inv targets of the 19 classes (semantic-kitti.yaml), written out here
RAW_IDS = {10, 11, 15, 18, 20, 30, 31, 32, 40, 44, 48, 49, 50, 51, 70, 71, 72, 80, 81}


def _sample(tmp_path: Path, **kw) -> Path:
    pytest.importorskip("open3d")
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    return generate_lidar_sample(tmp_path / "sample", **{"scans_per_sequence": 2, "azimuth_step_deg": 2.0, **kw})


@pytest.mark.slow
def test_ci_r_rapidseg_reaches_miou_absent_skip(tmp_path):
    pytest.importorskip("open3d")
    torch.set_num_threads(1)
    assert main(["run", "semantickitti-rapidseg", "--runs-dir", str(tmp_path / "runs"), *CI]) == 0
    (run,) = (tmp_path / "runs" / "semantickitti-rapidseg").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    # acceptance 4: mean over the classes present in ground truth or prediction (absent="skip")
    assert metrics["mIoU[absent=skip]"] >= 0.70, metrics
    assert metrics["mIoU[absent=zero]"] <= metrics["mIoU[absent=skip]"]
    # predictions of every val scan in the submission format: one uint32 raw id per point
    from threefold.datasets.semantickitti import SemanticKITTI

    val = SemanticKITTI(run / "data", "val")
    for item in (val[i] for i in range(len(val))):
        pred = np.fromfile(run / "predictions" / "sequences" / item["sequence"] / "predictions" / f"{item['frame']}.label", "<u4")
        assert pred.shape == (len(item["coord"]),) and set(np.unique(pred).tolist()) <= RAW_IDS
    ckpt = run / "stage2_seg" / "checkpoints" / "last.ckpt"
    # `threefold predict` on a root: the test sequences 11-21 present (here 11, one scan)
    root = tmp_path / "kitti"
    (root / "sequences" / "11" / "velodyne").mkdir(parents=True)
    scan = run / "data" / "sequences" / "08" / "velodyne" / "000000.bin"
    shutil.copy(scan, root / "sequences" / "11" / "velodyne" / "000000.bin")
    out = tmp_path / "pred"
    assert main(["predict", "semantickitti-rapidseg", "--checkpoint", str(ckpt), "--input", str(root), "--out", str(out)]) == 0
    on_root = np.fromfile(out / "sequences" / "11" / "predictions" / "000000.label", "<u4")
    ref = np.fromfile(run / "predictions" / "sequences" / "08" / "predictions" / "000000.label", "<u4")
    np.testing.assert_array_equal(on_root, ref)  # same scan, same model, same labels
    # and on one .bin (sequence read from its path)
    assert main(["predict", "semantickitti-rapidseg", "--checkpoint", str(ckpt), "--input", str(scan), "--out", str(out / "one")]) == 0
    np.testing.assert_array_equal(np.fromfile(out / "one" / "sequences" / "08" / "predictions" / "000000.label", "<u4"), ref)
    # figures of the first val scan: the synthetic scene's road and car in their official colours
    check_lidar_figures(run, run / "data", {40: (255, 0, 255), 10: (100, 150, 245)})


def test_minkunet_baseline_runs_and_writes_predictions(tmp_path):
    root = _write_plain_scans(tmp_path / "kitti")
    args = ["run", "semantickitti-minkunet", "--data", str(root), "--runs-dir", str(tmp_path / "runs"), "model.voxel_size=0.4",
            "model.width=0.125", "trainer.max_steps=2", "trainer.accelerator=cpu"]
    assert main(args) == 0
    (run,) = (tmp_path / "runs" / "semantickitti-minkunet").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["variant"] == "none" and "mIoU[absent=zero]" in metrics and "IoU/road" in metrics
    assert not (run / "stage1_ae").exists()  # no autoencoder to pretrain
    (pred,) = (run / "predictions" / "sequences" / "08" / "predictions").glob("*.label")
    assert np.fromfile(pred, "<u4").shape == (6000,)
    check_lidar_figures(run, root, {40: (255, 0, 255), 50: (255, 200, 0)})  # road, building (RGB)


def decode(path: Path) -> np.ndarray:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    return imread(path)


def check_lidar_figures(run: Path, root: Path, gt_rgb: dict[int, tuple[int, int, int]]) -> None:
    """The figures of ``run`` (first val scan 08/000000 of ``root``): names, sizes (100 dpi: bird's-eye
    3 panels x 500 px + 200 px legend; range 11 in wide, 3 x (1.28 + 0.35) in tall; confusion and bars
    of the 19 classes), not blank, the official RGB of the ground-truth raw ids ``gt_rgb`` present,
    the caption's accuracy equal to one counted from the raw files, and every link of report.md."""
    figs = run / "figures"
    expected = {"seq08_000000_bev.png": (500, 1700), "seq08_000000_range.png": (489, 1100),
                "seq08_000000_confusion.png": (1200, 1200), "per_class.png": (360, 1005)}
    assert set(expected) <= {p.name for p in figs.glob("*.png")}
    for name, shape in expected.items():
        img = decode(figs / name)
        assert img.shape[:2] == shape, (name, img.shape)
        gray = img[..., :3].mean(-1)
        assert gray.var() > 2e-3 and (gray < 0.9).mean() > 0.01, f"{name} looks blank"
    for name in ("seq08_000000_bev.png", "seq08_000000_range.png"):
        img = decode(figs / name)[..., :3]
        for raw, rgb in gt_rgb.items():
            assert (np.abs(img - np.asarray(rgb) / 255).max(-1) < 0.01).sum() > 20, (name, raw)
    from threefold.pipelines.figures import png_caption

    pred = np.fromfile(run / "predictions" / "sequences" / "08" / "predictions" / "000000.label", "<u4")
    gt = np.fromfile(root / "sequences" / "08" / "labels" / "000000.label", "<u4") & 0xFFFF
    from threefold.datasets.semantickitti import semantickitti_config

    c = semantickitti_config()  # the official yaml: moving-car (252) is car (10) once learnt, etc.
    learnt = np.array([c["learning_map"].get(int(r), 0) for r in gt])
    canonical = np.array([c["learning_map_inv"][int(k)] for k in learnt])
    labelled = learnt != 0
    m = re.search(r"Point accuracy ([0-9.]+) over (\d+) labelled points", png_caption(figs / "seq08_000000_bev.png"))
    assert int(m.group(2)) == labelled.sum()
    assert float(m.group(1)) == pytest.approx((pred == canonical)[labelled].mean(), abs=1e-4)
    report = (run / "report.md").read_text()
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", report)
    assert {f"figures/{n}" for n in expected} <= set(links)
    assert all((run / link).is_file() for link in links)


def test_c_rapidseg_trains_and_evaluates_in_two_passes(tmp_path):
    """C-RAPiD-Seg: ground-truth C-RAPiD rows in training, pseudo-labels of an R-RAPiD-Seg checkpoint at
    evaluation and in `threefold predict`."""
    root = _write_plain_scans(tmp_path / "kitti")
    tiny = ["--data", str(root), "model.voxel_size=0.4", "model.width=0.125", "model.latents=2", "model.dim=8",
            "model.inner_dim=2", "model.stream_channels=8", "ae.epochs=1", "trainer.max_steps=2", "trainer.accelerator=cpu"]
    assert main(["run", "semantickitti-rapidseg", "--runs-dir", str(tmp_path / "r"), *tiny]) == 0
    (r_run,) = (tmp_path / "r" / "semantickitti-rapidseg").iterdir()
    r_ckpt = r_run / "stage2_seg" / "checkpoints" / "last.ckpt"
    args = ["run", "semantickitti-rapidseg", "--runs-dir", str(tmp_path / "c"), *tiny, "model.variant=c", f"model.r_checkpoint={r_ckpt}"]
    assert main(args) == 0
    (c_run,) = (tmp_path / "c" / "semantickitti-rapidseg").iterdir()
    metrics = json.loads((c_run / "metrics.json").read_text())
    assert metrics["variant"] == "c" and "mIoU[absent=skip]" in metrics
    assert (c_run / "cache" / "rapid-c").is_dir()  # ground-truth C-RAPiD rows were built for training
    c_ckpt = c_run / "stage2_seg" / "checkpoints" / "last.ckpt"
    out = tmp_path / "pred"
    scan = root / "sequences" / "08" / "velodyne" / "000000.bin"
    assert main(["predict", "semantickitti-rapidseg", "--checkpoint", str(c_ckpt), "--input", str(scan), "--out", str(out)]) == 0
    assert np.fromfile(out / "sequences" / "08" / "predictions" / "000000.label", "<u4").shape == (6000,)


def test_resume_restores_both_stages(tmp_path):
    """`--resume` on a finished run: each stage reopens its own last.ckpt (stage1_ae/, stage2_seg/),
    trains no further step, and the evaluation gives the same numbers."""
    root = _write_plain_scans(tmp_path / "kitti")
    assert main(["run", "semantickitti-rapidseg", "--data", str(root), "--runs-dir", str(tmp_path / "runs"),
                 "model.voxel_size=0.4", "model.width=0.125", "model.latents=2", "model.dim=8", "model.inner_dim=2",
                 "model.stream_channels=8", "ae.epochs=2", "trainer.max_epochs=2", "trainer.accelerator=cpu"]) == 0
    (run,) = (tmp_path / "runs" / "semantickitti-rapidseg").iterdir()
    first = json.loads((run / "metrics.json").read_text())
    assert main(["run", "semantickitti-rapidseg", "--resume", str(run)]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["global_step"] == first["global_step"] == 2 and again["ae_steps"] == first["ae_steps"] == 2
    assert again["mIoU[absent=zero]"] == pytest.approx(first["mIoU[absent=zero]"], abs=1e-12)


def test_variant_is_fixed_by_pipeline(tmp_path, capsys):
    assert main(["run", "semantickitti-minkunet", "--runs-dir", str(tmp_path), "model.variant=r"]) == 2
    assert "model.variant='r'" in capsys.readouterr().err


def test_collate_and_class_weights(tmp_path):
    root = _sample(tmp_path)
    from threefold.datasets.semantickitti import SemanticKITTI

    scans = SemanticKITTI(root, "train")
    w = np.asarray(class_weights(scans, "inverse_sqrt"))
    counts = sum(np.bincount(scans[i]["label"].numpy()[scans[i]["label"].numpy() >= 0], minlength=19) for i in range(len(scans)))
    present = counts > 0
    ref = 1 / np.sqrt(counts[present] / counts.sum())
    np.testing.assert_allclose(w[present], ref / ref.mean(), rtol=1e-12)
    assert (w[~present] == 0).all()
    ds = ScanDataset(scans, None, True, AugmentConfig(crop=20.0), False, seed=3)
    a, b = ds[1], ds[1]
    torch.testing.assert_close(a["coord"], b["coord"])  # (seed, epoch, i) fixes the augmentation
    assert (a["coord"][:, :2].abs() <= 20.0).all() and len(a["coord"]) < len(scans[1]["coord"])
    ds.epoch = 1
    assert not torch.equal(ds[1]["coord"][:50], a["coord"][:50])
    batch = collate_scans([ds[0], ds[1]])
    n0, n1 = batch["num_points"]
    assert batch["coord"].shape == (n0 + n1, 3) and batch["label"].shape == (n0 + n1,)
    assert torch.equal(batch["batch"], torch.cat([torch.zeros(n0), torch.ones(n1)]).long())


def _write_plain_scans(root: Path, n: int = 6000) -> Path:
    """A tiny scene in the official layout, written from the format specification (float32 x, y, z,
    remission records; uint32 raw labels): ground (raw 40, road) at z = -1.7 m and a box wall (raw 50,
    building). No open3d needed (the GPU machine has none)."""
    rng = np.random.default_rng(0)
    for seq, frames in (("00", 2), ("08", 1)):
        for f in range(frames):
            xy = rng.uniform(-20, 20, (n, 2))
            wall = rng.random(n) < 0.3
            z = np.where(wall, rng.uniform(-1.7, 2.0, n), -1.7 + rng.normal(0, 0.02, n))
            xy[wall, 0] = 8.0 + rng.normal(0, 0.05, wall.sum())
            pts = np.concatenate([xy, z[:, None], rng.random((n, 1))], 1).astype("<f4")
            raw = np.where(wall, 50, 40).astype("<u4")
            for sub, data in (("velodyne", pts), ("labels", raw)):
                (root / "sequences" / seq / sub).mkdir(parents=True, exist_ok=True)
                data.tofile(root / "sequences" / seq / sub / f"{f:06d}.{'bin' if sub == 'velodyne' else 'label'}")
    return root


@pytest.mark.gpu
def test_pipeline_trains_on_cuda(tmp_path):
    """Both stages and the evaluation on CUDA under Lightning's deterministic mode (a float cumsum or
    CUDA NLL loss would raise there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = _write_plain_scans(tmp_path / "kitti")
    args = ["run", "semantickitti-rapidseg", "--data", str(root), "--runs-dir", str(tmp_path / "runs"), "model.voxel_size=0.2",
            "model.width=0.25", "ae.epochs=1", "trainer.max_epochs=6", "optim.name=adamw", "optim.lr=3e-3", "optim.warmup_epochs=1",
            "trainer.accelerator=gpu", "trainer.deterministic=true"]
    assert main(args) == 0
    (run,) = (tmp_path / "runs" / "semantickitti-rapidseg").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["IoU/road"] > 0 and metrics["eval_scans"] == 1


def test_eval_precision_key_fp32_default_and_fp16_needs_cuda():
    """``eval.precision``: fp32 (the shipped default) labels exactly as the network's own forward and
    as ``RAPiDSeg.predict(precision="fp32")``; fp16 on a CPU batch and unknown values are clear errors."""
    from threefold.datasets.errors import ConfigError
    from threefold.pipelines.config import config_to_dict
    from threefold.pipelines.rapidseg import RapidSegConfig, RapidSegModule

    cfg = RapidSegConfig()
    assert cfg.eval.precision == "fp32"
    for name in ("semantickitti-rapidseg", "semantickitti-minkunet"):  # the YAMLs carry the key, as fp32
        text = (Path(__file__).resolve().parents[2] / "pipelines" / "configs" / f"{name}.yaml").read_text()
        assert re.search(r"^  precision: fp32\b", text, re.M), name
    cfg.model.voxel_size, cfg.model.width, cfg.model.latents, cfg.model.dim = 0.5, 0.125, 4, 16
    cfg.model.inner_dim, cfg.model.stream_channels = 4, 8
    module = RapidSegModule({"config": config_to_dict(cfg), "stage": "seg"}).eval()
    g = torch.Generator().manual_seed(0)
    n = 600
    batch = {"coord": torch.rand(n, 3, generator=g) * 10 - 5, "remission": torch.rand(n, generator=g),
             "batch": torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long(),
             "rapid": torch.rand(n, cfg.features.k_max, generator=g)}
    got = module.predict_batch(batch)
    with torch.no_grad():
        direct = module.net(batch["coord"], batch["remission"], batch["batch"], batch["rapid"]).argmax(1)
    assert got.dtype == torch.long and torch.equal(got, direct)
    via_predict = module.net.predict(batch["coord"], batch["remission"], batch["batch"], batch["rapid"], precision="fp32")
    assert torch.equal(got, via_predict.argmax(1))
    module.cfg.eval.precision = "fp16"
    with pytest.raises(ConfigError, match=r"eval.precision='fp16' needs CUDA"):
        module.predict_batch(batch)
    module.cfg.eval.precision = "bf16"
    with pytest.raises(ConfigError, match=r"eval.precision='bf16': expected one of"):
        module.predict_batch(batch)
    # evaluate / predict from a checkpoint take the invoking config's precision, not the stored one
    from threefold.pipelines.rapidseg import SemanticKittiRapidSeg

    invoking = RapidSegConfig()
    invoking.eval.precision = "fp16"
    assert SemanticKittiRapidSeg()._inference_precision(module, invoking).cfg.eval.precision == "fp16"
    invoking.eval.precision = "half"
    with pytest.raises(ConfigError, match=r"eval.precision='half'"):
        SemanticKittiRapidSeg()._inference_precision(module, invoking)
