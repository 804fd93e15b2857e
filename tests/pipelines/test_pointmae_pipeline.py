"""The four Point-MAE pipelines end to end on the embedded procedural sample (CI-size overrides):
pretraining, its checkpoint loaded by path into the SVM and fine-tuning pipelines, errors. The figures
of pretraining, ModelNet40 fine-tuning and the SVM are checked in test_figures_points.py; the
ScanObjectNN fine-tuning run here checks its own (same ``_FinetunePipeline.figures``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("h5py")

MODEL = ["model.num_group=8", "model.group_size=16", "model.dim=24", "model.depth=1", "model.heads=2",
         "model.embed_width=8"]
SMALL = ["num_points=256", "sample.train_per_class=2", "sample.test_per_class=1", "sample.points=512",
         "trainer.num_workers=0", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "trainer.log_every_n_steps=1", *MODEL]


def run(pipeline: str, *args: str) -> Path:
    from threefold.pipelines.cli import main

    assert main(["run", pipeline, *SMALL, *args]) == 0
    (run_dir,) = sorted((Path("runs") / pipeline).iterdir())[-1:]
    return run_dir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pointmae")


@pytest.fixture(scope="module")
def pretrained(workdir) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("OMP_NUM_THREADS", "1")
        run_dir = run("shapenet-pointmae-pretrain", "model.decoder_depth=1", "model.decoder_heads=2",
                      "trainer.max_epochs=2", "trainer.batch_size=8", "optim.warmup_epochs=1")
    return workdir / run_dir


def test_pretrain_reports_held_out_cd_and_baseline(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["dataset"] == "embedded-procedural" and metrics["global_step"] == 2 * 3  # 24 shapes / 8
    assert 0 < metrics["test_cdl2"] < 1 and 0 < metrics["test_baseline_cdl2"] < 1
    assert metrics["reference_params"] == 29_006_432 and metrics["params"] < 1e6
    stored = torch.load(pretrained / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert stored["hyper_parameters"]["config"]["model"]["dim"] == 24
    assert (pretrained / "data" / "shapenet55" / "shapenet_pc").is_dir()


def test_svm_and_finetune_load_the_pretrained_checkpoint(pretrained, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    with_pre = json.loads((run("modelnet40-pointmae-svm", f"pretrained={ckpt}") / "metrics.json").read_text())
    scratch = json.loads((run("modelnet40-pointmae-svm") / "metrics.json").read_text())
    assert with_pre["test_count"] == 12 and with_pre["train_count"] == 24
    assert 0 <= with_pre["svm_acc"] <= 1 and with_pre["svm_acc"] * 12 == pytest.approx(round(with_pre["svm_acc"] * 12))
    assert with_pre["pretrained"] == str(ckpt) and scratch["pretrained"] is None

    ft = run("modelnet40-pointmae-finetune", f"pretrained={ckpt}", "trainer.max_epochs=1", "trainer.batch_size=8",
             "oversample=300", "vote_repeats=2")
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["encoder_tensors_loaded"] == len(torch.load(ckpt, weights_only=True)["state_dict"]) - sum(
        not k.startswith("model.encoder.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    assert {"test_acc", "test_mean_class_acc", "test_vote_acc"} <= set(metrics) and metrics["global_step"] == 3
    assert 0 <= metrics["test_acc"] <= 1

    # The checkpoint's classifier from Python gives the run's single-pass test accuracy.
    from threefold.datasets.objects import ModelNet40, collate_objects
    from threefold.pipelines import load

    test = collate_objects([s for s in ModelNet40(ft / "data" / "modelnet40", "test", 512)])
    pred = load("modelnet40-pointmae-finetune", ft / "checkpoints" / "last.ckpt").predict(test["coord"])
    assert (pred == test["category"]).double().mean().item() == pytest.approx(metrics["test_acc"])

    scan = run("scanobjectnn-pointmae-finetune", "trainer.max_epochs=1", "trainer.batch_size=8", "oversample=300")
    metrics = json.loads((scan / "metrics.json").read_text())
    assert metrics["encoder_tensors_loaded"] == 0 and 0 <= metrics["test_acc"] <= 1
    # issue #11: per-class accuracy (15 classes) and confusion matrix, exist / decode / size / not blank / linked
    pytest.importorskip("matplotlib")
    import re

    from figure_checks import check_run_figures

    from threefold.pipelines.figures import png_caption

    expected = {"per_class_accuracy.png": (360, int(100 * (0.45 * 15 + 1.5))), "confusion_matrix.png": (1000, 1000)}
    figs = scan / "figures"
    assert "curves.png" in check_run_figures(figs, (scan / "report.md").read_text(), expected)
    overall = re.search(r"overall ([0-9.]+)", png_caption(figs / "per_class_accuracy.png"))
    assert float(overall.group(1)) == pytest.approx(metrics["test_acc"], abs=1e-4)


def test_bad_pretrained_paths_and_widths_are_reported(pretrained, workdir, monkeypatch, capsys):
    from threefold.pipelines.cli import main

    monkeypatch.chdir(workdir)
    assert main(["run", "modelnet40-pointmae-svm", *SMALL, "pretrained=nowhere.ckpt"]) == 1
    assert "nowhere.ckpt" in capsys.readouterr().err
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    assert main(["run", "modelnet40-pointmae-svm", *SMALL, "model.dim=32", f"pretrained={ckpt}"]) == 2
    assert "widths" in capsys.readouterr().err
    assert main(["run", "modelnet40-pointmae-finetune", *SMALL, "trainer.batch_size=64"]) == 2
    assert "batch_size=64" in capsys.readouterr().err


def test_warmup_cosine_schedule_is_the_reference_shape():
    from threefold.pipelines.pointmae import _warmup_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    o = {"lr": 1e-3, "min_lr": 1e-6, "warmup_epochs": 10}
    sched = _warmup_cosine(opt, o, 300)
    lrs = []
    for _ in range(301):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    for e in (10, 150, 299, 300):
        want = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 300))
        assert lrs[e] == pytest.approx(want)
