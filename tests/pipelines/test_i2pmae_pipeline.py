"""The I2P-MAE pipelines end to end on the embedded procedural sample (CI-size overrides): pretraining
with the random-ViT teacher, its checkpoint loaded by path into the SVM and fine-tuning pipelines,
the shipped configs' reference hyper-parameters, errors; and the figures of issue #11 for all four I2P-MAE
pipelines (pretraining: depth views with the 2D-guided saliency, reconstructions; fine-tuning on ScanObjectNN
and ModelNet40, which share ``_FinetunePipeline.figures``, and the SVM: per-class accuracy, confusion
matrix, PCA) — PNGs that exist, decode, have the documented size, are not blank, are linked by report.md,
and whose captions agree with metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("h5py")

MODEL = ["num_points=256", "model.num_groups=[32,16,4]", "model.dims=[16,16,32]", "model.depths=[1,1,1]",
         "model.heads=2", "model.embed_width=8"]
SMALL = ["sample.train_per_class=2", "sample.test_per_class=1", "sample.points=512", "trainer.num_workers=0",
         "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", *MODEL]
TEACHER = ["teacher.random_output_dim=8", "teacher.random_width=32", "teacher.random_layers=1", "teacher.random_heads=2"]


def run(pipeline: str, *args: str) -> Path:
    from threefold.pipelines.cli import main

    assert main(["run", pipeline, *SMALL, *args]) == 0
    (run_dir,) = sorted((Path("runs") / pipeline).iterdir())[-1:]
    return run_dir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("i2pmae")


@pytest.fixture(scope="module")
def pretrained(workdir) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("OMP_NUM_THREADS", "1")
        run_dir = run("shapenet-i2pmae-pretrain", *TEACHER, "model.group_sizes=[8,4,4]", "trainer.max_epochs=2",
                      "trainer.batch_size=8", "optim.warmup_epochs=1")
    return workdir / run_dir


def test_shipped_configs_carry_the_reference_hyper_parameters():
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.i2pmae import FinetuneConfig, PretrainConfig, SVMConfig

    pre = resolve_config(PretrainConfig, "shapenet-i2pmae-pretrain")
    assert (pre.num_points, pre.trainer.batch_size, pre.trainer.max_epochs) == (2048, 64, 300)
    assert (pre.optim.lr, pre.optim.weight_decay, pre.optim.warmup_epochs) == (1e-3, 0.05, 10)
    m = pre.model
    assert (m.num_groups, m.group_sizes, m.dims, m.depths, m.heads) == ([512, 256, 64], [16, 8, 8], [96, 192, 384],
                                                                        [5, 5, 5], 6)
    assert (m.mask_ratio, m.decoder_depths, m.drop_path) == (0.8, [1, 1], 0.1)
    scan = resolve_config(FinetuneConfig, "scanobjectnn-i2pmae-finetune")
    assert (scan.num_points, scan.model.group_sizes, scan.model.radii) == (2048, [32, 16, 16], [0.48, 0.96, 1.92])
    assert (scan.optim.lr, scan.trainer.batch_size, scan.trainer.gradient_clip_val) == (5e-4, 32, 10.0)
    mn = resolve_config(FinetuneConfig, "modelnet40-i2pmae-finetune")
    assert (mn.num_points, mn.model.group_sizes, mn.model.radii, mn.label_smoothing, mn.model.pooling) == (
        1024, [48, 24, 24], [0.24, 0.48, 0.96], 0.2, "sum")
    svm = resolve_config(SVMConfig, "modelnet40-i2pmae-svm")
    assert svm.svm_c is None and svm.num_points == 1024
    from threefold.pipelines.i2pmae import SVM_C, reference_smoothing

    assert SVM_C == {"modelnet40": 0.0093, "scanobjectnn": 0.018}
    # The reference's smooth_loss (1 - eps on the class, eps / (C - 1) elsewhere) as torch's label_smoothing.
    logits, target = torch.randn(5, 40), torch.tensor([0, 3, 7, 39, 12])
    one_hot = torch.nn.functional.one_hot(target, 40).double()
    soft = one_hot * 0.8 + (1 - one_hot) * 0.2 / 39
    want = -(soft * logits.double().log_softmax(1)).sum(1).mean()
    got = torch.nn.functional.cross_entropy(logits.double(), target, label_smoothing=reference_smoothing(0.2, 40))
    torch.testing.assert_close(got, want)


def test_pretrain_reports_held_out_cd_baseline_and_2d_loss(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["dataset"] == "embedded-procedural" and metrics["global_step"] == 2 * 3  # 24 shapes / 8
    assert 0 < metrics["test_cdl2"] < 2 and 0 < metrics["test_baseline_cdl2"] < 1 and metrics["test_loss_2d"] > 0
    assert metrics["teacher"].startswith("random ViT") and metrics["params"] < 1e6
    stored = torch.load(pretrained / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in k for k in stored["state_dict"])  # the frozen teacher is not checkpointed
    assert stored["hyper_parameters"]["config"]["model"]["num_groups"] == [32, 16, 4]


def test_pretrain_figures(pretrained):
    """Issue #11: the pretraining run on the embedded default draws curves, the three depth views with
    the 2D-guided saliency (one held-out shape) and masked input / reconstruction / ground truth: PNGs
    that exist, decode, have the documented size, are not blank, whose caption states the mask ratio's
    visible count (4 top-scale tokens, ratio 0.8: 4 - int(3.2) = 1 visible) and one CD-L2 per shape, all
    linked by report.md."""
    pytest.importorskip("matplotlib")
    import re

    from matplotlib.image import imread

    from threefold.pipelines.figures import png_caption

    figs = pretrained / "figures"
    cats = len({p.name.split("-")[0] for p in (pretrained / "data" / "shapenet55" / "shapenet_pc").glob("*.npy")})
    rows = min(4, cats)  # the first test shape of up to four categories
    expected = {"depth_views.png": (600, 900), "reconstructions.png": (300 * rows, 900)}
    assert sorted(p.name for p in figs.glob("*.png")) == sorted([*expected, "curves.png"])
    for name in [*expected, "curves.png"]:
        img = imread(figs / name)
        if name == "curves.png":  # 400 x 320 px per logged metric family, at most 3 a row
            assert img.shape[0] % 320 == 0 and img.shape[1] % 400 == 0, img.shape
        else:
            assert img.shape[:2] == expected[name], (name, img.shape)
        gray = img[..., :3].mean(-1)
        assert gray.var() > 2e-3 and (gray < 0.9).mean() > 0.01, f"{name} looks blank"
    assert "keeps 1 of 4 top-scale tokens visible" in png_caption(figs / "depth_views.png")
    caption = png_caption(figs / "reconstructions.png")
    assert "scale 1 (16 tokens x 4 points;" in caption and caption.count("CD-L2") == rows + 1
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", (pretrained / "report.md").read_text())
    assert sorted(links) == sorted(f"figures/{n}" for n in [*expected, "curves.png"])
    assert all((pretrained / link).is_file() for link in links)


def test_svm_and_finetune_load_the_pretrained_checkpoint(pretrained, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    svm_run = run("modelnet40-i2pmae-svm", "model.group_sizes=[8,4,4]", f"pretrained={ckpt}")
    pre = json.loads((svm_run / "metrics.json").read_text())
    assert pre["train_count"] == 24 and pre["test_count"] == 12 and pre["svm_c"] == 0.0093
    assert 0 <= pre["svm_acc"] <= 1 and pre["pretrained"] == str(ckpt)
    scan = json.loads((run("modelnet40-i2pmae-svm", "model.group_sizes=[8,4,4]", "dataset=scanobjectnn")
                       / "metrics.json").read_text())
    assert scan["svm_c"] == 0.018 and scan["pretrained"] is None and scan["dataset"].endswith("scanobjectnn")

    ft = run("scanobjectnn-i2pmae-finetune", "model.group_sizes=[8,4,4]", "model.radii=[0.3,0.6,1.2]",
             f"pretrained={ckpt}", "trainer.max_epochs=1", "trainer.batch_size=8")
    metrics = json.loads((ft / "metrics.json").read_text())
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert metrics["encoder_tensors_loaded"] == sum(k.startswith("model.encoder.") and ".norms." not in k for k in state)
    assert 0 <= metrics["test_acc"] <= 1 and metrics["global_step"] == 3

    from threefold.datasets.objects import ScanObjectNN, collate_objects
    from threefold.pipelines import load

    test = collate_objects([s for s in ScanObjectNN(ft / "data" / "scanobjectnn", "test", "pb_t50_rs", None)])
    pred = load("scanobjectnn-i2pmae-finetune", ft / "checkpoints" / "last.ckpt").predict(test["coord"])
    assert (pred == test["category"]).double().mean().item() == pytest.approx(metrics["test_acc"])

    mn = run("modelnet40-i2pmae-finetune", "model.group_sizes=[8,4,4]", "trainer.max_epochs=1",
             "trainer.batch_size=8", "oversample=300")
    mn_metrics = json.loads((mn / "metrics.json").read_text())
    assert 0 <= mn_metrics["test_acc"] <= 1

    # issue #11 figures (fine-tuning: scanobjectnn and modelnet40 share _FinetunePipeline.figures)
    pytest.importorskip("matplotlib")
    with open(mn / "data" / "modelnet40" / "modelnet40_shape_names.txt") as f:
        classes = len(f.read().split())
    for run_dir, n, acc in ((ft, 15, metrics["test_acc"]), (mn, classes, mn_metrics["test_acc"])):
        side = int(100 * min(12.0, max(4.5, 0.5 * n + 2.5)))
        bars = int(100 * max(4.0, 0.45 * n + 1.5))
        check_pngs(run_dir, {"curves.png": None, "per_class_accuracy.png": (360, bars), "confusion_matrix.png": (side, side)})
        assert overall_accuracy(run_dir / "figures" / "per_class_accuracy.png") == pytest.approx(acc, abs=1e-4)
    side, bars = int(100 * min(12.0, max(4.5, 0.5 * classes + 2.5))), int(100 * max(4.0, 0.45 * classes + 1.5))
    check_pngs(svm_run, {"per_class_accuracy.png": (360, bars), "confusion_matrix.png": (side, side),
                         "embedding_pca.png": (450, 500)})
    assert overall_accuracy(svm_run / "figures" / "per_class_accuracy.png") == pytest.approx(pre["svm_acc"], abs=1e-4)


def check_pngs(run_dir: Path, expected: dict[str, tuple[int, int] | None]) -> None:
    """Exactly these PNGs under figures/: decode, size (None: curves, 400 x 320 px per metric family),
    not blank, each linked from report.md."""
    from matplotlib.image import imread

    figs = run_dir / "figures"
    assert sorted(p.name for p in figs.glob("*.png")) == sorted(expected)
    report = (run_dir / "report.md").read_text()
    for name, shape in expected.items():
        img = imread(figs / name)
        if shape is None:
            assert img.shape[0] % 320 == 0 and img.shape[1] % 400 == 0, img.shape
        else:
            assert img.shape[:2] == shape, (name, img.shape)
        gray = img[..., :3].mean(-1)
        assert gray.var() > 2e-3 and (gray < 0.9).mean() > 0.01, f"{name} looks blank"
        assert f"(figures/{name})" in report


def overall_accuracy(path: Path) -> float:
    import re

    from threefold.pipelines.figures import png_caption

    m = re.search(r"overall ([0-9.]+)", png_caption(path))
    assert m, png_caption(path)
    return float(m.group(1))


def test_bad_inputs_are_reported(pretrained, workdir, monkeypatch, capsys):
    from threefold.pipelines.cli import main

    monkeypatch.chdir(workdir)
    assert main(["run", "modelnet40-i2pmae-svm", *SMALL, "pretrained=nowhere.ckpt"]) == 1
    assert "nowhere.ckpt" in capsys.readouterr().err
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    assert main(["run", "modelnet40-i2pmae-svm", *SMALL, "model.dims=[16,16,48]", f"pretrained={ckpt}"]) == 2
    assert "widths" in capsys.readouterr().err
    assert main(["run", "shapenet-i2pmae-pretrain", *SMALL, "trainer.batch_size=8", "teacher.checkpoint=missing-clip.pt"]) == 1
    assert "missing-clip.pt" in capsys.readouterr().err
    assert main(["run", "modelnet40-i2pmae-svm", *SMALL, "dataset=shapenet"]) == 2
    assert "dataset='shapenet'" in capsys.readouterr().err
