"""Issue #12, acceptance: a real pipeline under DDP with 2 gloo processes gives the metrics of 1 process.

``semantickitti-rapidseg`` (reduced CI model, 3 training and 3 validation scans of the synthetic
sample) is trained with ``trainer.devices=2 trainer.strategy=ddp trainer.accelerator=cpu`` — both
stages, autoencoder then segmentation, in 2 processes — and evaluated in those 2 processes at the
end of the run; its last checkpoint is then evaluated again with ``threefold eval`` in 1 process
and in 2 processes. The three evaluations must agree exactly on the integer counts (scans and points
scored) and to 1e-6 on every IoU, mIoU and accuracy, and they must equal the confusion matrix
counted here with NumPy from the submission files the 2-process evaluation wrote.

Why it can fail: 3 validation scans over 2 ranks make Lightning's ``DistributedSampler`` pad rank 1
with a repeat of scan 0; a pipeline that scores the repeat counts 4 scans and more points, one that
does not reduce its confusion matrix across ranks reports one rank's share, and a rank that skips a
collective hangs the run (the subprocess timeout fails the test).

The ``trainer.sync_batchnorm`` resolution (auto: GPUs only; ``true`` on CPU processes uses
``AllReduceSyncBatchNorm``) is checked without launching processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

CLI = [sys.executable, "-m", "threefold.pipelines.cli"]

# the reduced CI model of tests/pipelines/test_rapidseg_pipeline.py; 6 segmentation epochs are enough for
# predictions spread over several classes (a model predicting one class would compare trivially)
TINY = [
    "model.voxel_size=0.2", "model.width=0.25", "model.latents=4", "model.dim=16", "model.inner_dim=4",
    "model.stream_channels=16", "ae.epochs=1", "optim.name=adamw", "optim.lr=3e-3", "trainer.max_epochs=6",
    "trainer.batch_size=1", "trainer.accelerator=cpu",
]
DDP2 = ["trainer.devices=2", "trainer.strategy=ddp"]
N_VAL = 3  # odd: the 2-rank DistributedSampler pads one repeat


def threefold(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("THREEFOLD_RUN_DIR", "THREEFOLD_RESUME"):
        env.pop(key, None)
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _only(folder: Path) -> Path:
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run


def _numpy_scores(root: Path, predictions: Path) -> dict[str, float]:
    """Overall accuracy, mIoU[absent=zero] and the point count from the submission files, counted with
    NumPy (the official evaluator's rules: ground-truth -1 ignored, IoU = TP / (TP + FP + FN))."""
    from threefold.datasets.semantickitti import SEMANTICKITTI_CLASSES, read_labels

    c = len(SEMANTICKITTI_CLASSES)
    conf = np.zeros((c, c), np.int64)
    points = 0
    for bin_path in sorted((root / "sequences" / "08" / "velodyne").glob("*.bin")):
        n = bin_path.stat().st_size // 16  # x, y, z, remission float32
        truth = read_labels(root / "sequences" / "08" / "labels" / f"{bin_path.stem}.label", n)
        pred = read_labels(predictions / "sequences" / "08" / "predictions" / f"{bin_path.stem}.label", n)
        keep = truth >= 0
        np.add.at(conf, (truth[keep], pred[keep]), 1)
        points += n
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.divide(tp, union, out=np.zeros(c), where=union > 0)
    return {"accuracy[overall]": tp.sum() / conf.sum(), "mIoU[absent=zero]": iou.mean(), "eval_points": points}


@pytest.mark.slow
def test_rapidseg_ddp_two_processes_equals_one(tmp_path):
    pytest.importorskip("spconv")
    pytest.importorskip("open3d")
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    root = generate_lidar_sample(tmp_path / "sample", ("00", "08"), N_VAL, 0, 64, 2.0)
    cache = f"features.cache_dir={tmp_path / 'cache'}"
    out = threefold("run", "semantickitti-rapidseg", "--data", str(root), *TINY, *DDP2, cache, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    run = _only(tmp_path / "runs" / "semantickitti-rapidseg")
    trained = json.loads((run / "metrics.json").read_text())
    ckpt = run / "stage2_seg" / "checkpoints" / "last.ckpt"

    evals = {}
    for devices in (1, 2):
        out = threefold("eval", "semantickitti-rapidseg", "--checkpoint", str(ckpt), "--data", str(root),
                        f"trainer.devices={devices}", "trainer.strategy=ddp", "trainer.accelerator=cpu", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-4000:]
        folders = sorted((tmp_path / "runs" / "semantickitti-rapidseg-eval").iterdir())
        assert len(folders) == devices, folders  # DDP children joined the parent's folder, made none of their own
        evals[devices] = (folders[-1], json.loads((folders[-1] / "metrics.json").read_text()))

    one, two = evals[1][1], evals[2][1]
    assert (trained["eval_world_size"], one["eval_world_size"], two["eval_world_size"]) == (2, 1, 2)
    reference = _numpy_scores(root, evals[2][0] / "predictions")
    for m in (trained, one, two):
        # every validation scan exactly once: the padding repeat of scan 0 on rank 1 is not scored
        assert m["eval_scans"] == m["eval_scans_scored"] == N_VAL, m
        assert m["eval_points"] == reference["eval_points"], m
        keys = [k for k in m if k.startswith(("mIoU", "IoU/", "accuracy"))]
        assert len(keys) == 19 + 3
        for k in keys:
            assert m[k] == pytest.approx(one[k], abs=1e-6), (k, m[k], one[k])
        assert m["accuracy[overall]"] == pytest.approx(reference["accuracy[overall]"], abs=1e-6)
        assert m["mIoU[absent=zero]"] == pytest.approx(reference["mIoU[absent=zero]"], abs=1e-6)
    # a model that learned something: several classes predicted, not one everywhere
    assert sum(1 for k in one if k.startswith("IoU/") and one[k] > 0) >= 2, one


def test_sync_batchnorm_resolution():
    from threefold.pipelines.engine import has_batchnorm, resolve_sync_batchnorm

    # (setting, has_bn, world, on_gpu) -> synced
    assert resolve_sync_batchnorm(None, True, 2, True) is True
    assert resolve_sync_batchnorm(None, True, 2, False) is False  # CPU gloo: only when asked for
    assert resolve_sync_batchnorm(None, True, 1, True) is False  # one process: nothing to synchronise
    assert resolve_sync_batchnorm(None, False, 8, True) is False
    assert resolve_sync_batchnorm(False, True, 2, True) is False
    assert resolve_sync_batchnorm(True, True, 4, True) is True
    assert resolve_sync_batchnorm(True, True, 1, False) is False
    assert resolve_sync_batchnorm(True, True, 2, False) is True  # CPU processes: AllReduceSyncBatchNorm
    assert resolve_sync_batchnorm(True, False, 2, False) is False

    assert has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert has_batchnorm(torch.nn.SyncBatchNorm(4))
    for per_sample in (torch.nn.InstanceNorm3d(4, affine=True), torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4)):
        assert not has_batchnorm(torch.nn.Sequential(per_sample))


def test_sync_batchnorm_impl_choice(tmp_path):
    from threefold.datasets.errors import ConfigError
    from threefold.pipelines.config import TrainerConfig
    from threefold.pipelines.engine import RunContext, _sync_batchnorm_kwargs
    from threefold.pipelines.sync_batchnorm import AllReduceBatchNormSync

    def plugin_types(kwargs):
        return [type(p) for p in kwargs.get("plugins", [])]

    # (on_gpu, impl) -> torch's SyncBatchNorm through Lightning, or the AllReduce LayerSync plugin
    assert _sync_batchnorm_kwargs(True, [], "auto") == {"sync_batchnorm": True}
    assert _sync_batchnorm_kwargs(True, [], "torch") == {"sync_batchnorm": True}
    for on_gpu, impl in ((True, "allreduce"), (False, "allreduce"), (False, "auto")):
        kwargs = _sync_batchnorm_kwargs(on_gpu, ["io"], impl)
        assert "sync_batchnorm" not in kwargs and kwargs["plugins"][0] == "io"
        assert plugin_types(kwargs)[1:] == [AllReduceBatchNormSync]
    with pytest.raises(ConfigError, match="'torch'.*needs GPUs"):
        _sync_batchnorm_kwargs(False, [], "torch")
    # a misspelt value fails when the trainer is built, synchronised or not
    ctx = RunContext("p", tmp_path, TrainerConfig(sync_batchnorm_impl="all-reduce", accelerator="cpu"))
    with pytest.raises(ConfigError, match="sync_batchnorm_impl.*'all-reduce'.*auto, torch, allreduce"):
        ctx.trainer(torch.nn.Linear(2, 2))


def test_networks_that_need_sync_batchnorm():
    """The methods whose batch norm runs over per-GPU batches of 1-2 volumes or scans are the ones the
    automatic rule synchronises; Isensee's U-Net (instance norm) is left alone."""
    from threefold.medical.registration.nestedmorph import NestedMorph
    from threefold.medical.segmentation.unet import Isensee2017UNet
    from threefold.pipelines.engine import has_batchnorm

    assert has_batchnorm(NestedMorph(heads=2))  # BatchNorm3d in its attention blocks
    assert not has_batchnorm(Isensee2017UNet(4, 3, 4, 3, 0.0))
    if pytest.importorskip("spconv"):
        from threefold.pipelines.config import resolve_config
        from threefold.pipelines.rapidseg import RapidSegConfig, build_network

        cfg = resolve_config(RapidSegConfig, "semantickitti-rapidseg", overrides=TINY)
        assert has_batchnorm(build_network(cfg))  # MinkUNet34 BatchNorm1d on sparse features


def test_trainer_applies_sync_batchnorm_setting(tmp_path):
    """``RunContext.trainer(module)``: forced on CPU processes, the ``AllReduceSyncBatchNorm`` plugin
    (the atomic checkpoint IO kept); auto leaves CPU DDP unsynced."""
    from threefold.pipelines.config import TrainerConfig
    from threefold.pipelines.engine import RunContext
    from threefold.pipelines.sync_batchnorm import AllReduceBatchNormSync

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    cpu_ddp = dict(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False)
    forced = RunContext("x", tmp_path, TrainerConfig(**cpu_ddp, sync_batchnorm=True)).trainer(module)
    assert isinstance(forced.strategy._layer_sync, AllReduceBatchNormSync)
    assert type(forced.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    trainer = RunContext("x", tmp_path, TrainerConfig(**cpu_ddp)).trainer(module)
    assert trainer.num_devices == 2 and trainer.strategy._layer_sync is None
    # evaluation trainers (no module) never convert
    assert RunContext("x", tmp_path, TrainerConfig(**cpu_ddp, sync_batchnorm=True)).trainer().strategy._layer_sync is None


def test_rank_shard_sampler_splits_one_stream():
    from threefold.pipelines.loaders import RankShardSampler

    def stream(n: int):
        return torch.utils.data.RandomSampler(range(7), replacement=True, num_samples=n,
                                              generator=torch.Generator().manual_seed(3))

    single = list(stream(12))
    assert list(RankShardSampler(stream(12))) == single  # W = 1: the stream itself
    shards = [list(RankShardSampler(stream(36), 3, r)) for r in range(3)]
    assert [len(s) for s in shards] == [12, 12, 12]
    woven = [shards[p % 3][p // 3] for p in range(36)]
    assert woven == list(stream(36))  # every draw of the 3-rank stream taken by exactly one rank
    assert shards[0] != shards[1]  # ranks train on different draws (before: every rank the same shapes)
    assert len(RankShardSampler(stream(7), 2, 1)) == 3 == len(list(RankShardSampler(stream(7), 2, 1)))


def test_bspnet_ranks_draw_different_shapes():
    from types import SimpleNamespace

    from threefold.pipelines.bspnet import BSPDataModule

    data = {"voxels": np.zeros((9, 2, 2, 2, 1), np.uint8)}
    for r in (16, 32, 64):
        data[f"points_{r}"] = np.zeros((9, 1, 3), np.uint8)
        data[f"values_{r}"] = np.zeros((9, 1, 1), np.uint8)

    def indices(world: int, rank: int) -> list[int]:
        dm = BSPDataModule(data, batch_size=2, total_steps=5, seed=1)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        return list(dm.train_dataloader().sampler)

    one = indices(1, 0)
    assert one == list(torch.utils.data.RandomSampler(range(9), replacement=True, num_samples=10,
                                                      generator=torch.Generator().manual_seed(1)))
    r0, r1 = indices(2, 0), indices(2, 1)
    assert len(r0) == len(r1) == 10 and r0 != r1
    assert sorted(r0 + r1) == sorted(torch.utils.data.RandomSampler(range(9), replacement=True, num_samples=20,
                                                                    generator=torch.Generator().manual_seed(1)))


def test_external_launch_detection():
    from threefold.pipelines.cli import external_launch

    assert external_launch({}) is None
    assert external_launch({"TORCHELASTIC_RUN_ID": "j1", "RANK": "1", "WORLD_SIZE": "4"}) == (1, "torchrun-j1")
    assert external_launch({"TORCHELASTIC_RUN_ID": "j1", "RANK": "0", "WORLD_SIZE": "1"}) is None
    slurm = {"SLURM_PROCID": "3", "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "8"}
    assert external_launch(slurm) == (3, "slurm-777.2")
    assert external_launch({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: an ordinary run


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_run_folder(tmp_path, test_data):
    """``torchrun --nproc-per-node=2 -m threefold.pipelines.cli run ...`` (the multi-node path of
    docs/scaling.md on one machine): both ranks write into one folder named after the job, rank 0
    alone writes metrics, every test node is counted once, and a 1-process `threefold eval` of the
    checkpoint gives the same accuracy."""
    cora = test_data / "planetoid" / "raw"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("THREEFOLD_RUN_DIR", "THREEFOLD_RESUME"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "--rdzv-id=job42", "-m", "threefold.pipelines.cli", "run", "planetoid-gcn",
           "--data", str(cora), "num_seeds=1", "trainer.max_epochs=20", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.accelerator=cpu"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = (tmp_path / "runs" / "planetoid-gcn").iterdir()
    assert run.name == "torchrun-job42"
    ddp = json.loads((run / "metrics.json").read_text())["per_seed"][0]
    assert ddp["test_count"] == 1000
    out = threefold("eval", "planetoid-gcn", "--checkpoint", str(run / "seed0" / "checkpoints" / "last.ckpt"),
                    "--data", str(cora), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    single = json.loads((_only(tmp_path / "runs" / "planetoid-gcn-eval") / "metrics.json").read_text())
    assert single["test_count"] == 1000 and single["test_acc"] == pytest.approx(ddp["test_acc"], abs=1e-9)


TINY_DDP_RUNS = {
    # phase-dependent parameters (DDP must find unused ones) and rank-0-only mesh scoring
    "shapenet-bspnet": ["model.ef_dim=2", "model.p_dim=16", "model.c_dim=4", "train.steps_16=2", "train.steps_32=2",
                        "train.steps_64=2", "train.steps_final=2", "train.points_per_step=128", "trainer.batch_size=2",
                        "embedded.shapes_per_category=1", "eval.n_sample=1024", "eval.n_keep=256"],
    # rank-0-only sampling and scoring after the fit
    "qm9-uni3dar": ["limit_molecules=40", "trainer.max_epochs=1", "trainer.batch_size=8", "sample.num=8",
                    "sample.batch_size=8", "model.d_model=32", "model.layers=1", "model.heads=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", sorted(TINY_DDP_RUNS))
def test_rank_zero_evaluation_survives_ddp(tmp_path, pipeline):
    """Pipelines that train under DDP and then evaluate on rank 0 alone: the fit must not trip over
    parameters a phase leaves unused, and the evaluation's accumulators must not wait for the other
    rank at ``compute()`` (before the fix both runs failed with the peer gone)."""
    if pipeline == "qm9-uni3dar":
        pytest.importorskip("rdkit")  # the embedded molecules are RDKit conformers
    else:
        pytest.importorskip("h5py")
    out = threefold("run", pipeline, *TINY_DDP_RUNS[pipeline], *DDP2, "trainer.accelerator=cpu",
                    "trainer.enable_progress_bar=false", cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((_only(tmp_path / "runs" / pipeline) / "metrics.json").read_text())
    assert metrics["global_step"] > 0
    if pipeline == "qm9-uni3dar":
        assert "sampling" in metrics and metrics["sampling"]
    else:
        assert metrics["num_shapes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_trainer_syncs_batchnorm_on_two_gpus(tmp_path):
    """The automatic rule on a GPU host: 2 GPUs + batch norm -> SyncBatchNorm; 1 GPU or none -> plain."""
    from threefold.pipelines.config import TrainerConfig
    from threefold.pipelines.engine import RunContext

    bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ln = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    gpu = dict(accelerator="gpu", strategy="ddp", enable_progress_bar=False)
    assert RunContext("x", tmp_path, TrainerConfig(**gpu, devices=2)).trainer(bn).strategy._layer_sync is not None
    assert RunContext("x", tmp_path, TrainerConfig(**gpu, devices=2)).trainer(ln).strategy._layer_sync is None
    assert RunContext("x", tmp_path, TrainerConfig(**gpu, devices=1)).trainer(bn).strategy._layer_sync is None
    off = TrainerConfig(**gpu, devices=2, sync_batchnorm=False)
    assert RunContext("x", tmp_path, off).trainer(bn).strategy._layer_sync is None
