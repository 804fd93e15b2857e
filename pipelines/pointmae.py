"""Point-MAE pipelines (Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning",
ECCV 2022): ``shapenet-pointmae-pretrain``, ``modelnet40-pointmae-svm``, ``modelnet40-pointmae-finetune``
and ``scanobjectnn-pointmae-finetune``.

Recipes (the reference's ``cfgs/*.yaml``, shipped as ``pipelines/configs/<name>.yaml``):

* pretraining: ShapeNet-55 train split, 1024 points per shape (random subset of 8192), scale-and-translate
  augmentation, 64 patches × 32 points, mask ratio 0.6, AdamW lr 1e-3 wd 0.05, 10 linear warm-up
  epochs then cosine over 300 epochs, batch 128. Validation/test: masked-patch Chamfer-L2 on the test
  split with fixed masks, next to the nearest-visible-patch baseline on the same masks.
* fine-tuning: AdamW lr 5e-4 wd 0.05, cosine (300 epochs ModelNet40, 200 ScanObjectNN), batch 32,
  gradient clipping 10; training clouds are FPS-oversampled (1200 of the source points for 1024) and a
  random subset of ``num_points`` kept, test clouds are FPS'd to ``num_points``.
* SVM: max-pooled frozen encoder features of the train and test splits, ``SVC(kernel="linear", C)``.

Without ``--data`` each pipeline writes the embedded procedural sample
(:mod:`threefold.datasets.procedural_objects`) in its dataset's layout under ``<run>/data`` and reads it
with the real reader. A pretrained checkpoint (``pretrained=<path to last.ckpt or model.pt>``) loads into
the fine-tuning and SVM pipelines; its encoder widths must equal the model config's.

Reported numbers are single runs per seed; voting (``vote_repeats > 0``: logits of that many random
point subsets averaged) is reported under its own key, never instead of the single-pass accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from threefold.datasets.errors import ConfigError, MissingFileError
from threefold.datasets.objects import (
    ModelNet40,
    ModelNet40H5,
    ScaleAndTranslate,
    ScanObjectNN,
    ShapeNet55,
    collate_objects,
    few_shot_episode,
)
from threefold.datasets.splits import seed_everything
from threefold.geometry.neighbors import index_points
from threefold.geometry.pointmae import (
    PointMAE,
    PointMAEClassifier,
    PointMAEEncoder,
    count_parameters,
    max_pooled_features,
    nearest_visible_patch,
    patch_chamfer_l2,
)
from threefold.geometry.sampling import farthest_point_sampling
from threefold.pipelines.config import RunConfig, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint, write_metrics
from threefold.pipelines.loaders import ResumableDataLoader
from threefold.pipelines.metrics import ClassificationMetrics
from threefold.pipelines.metrics.distributed import batch_real_mask
from threefold.pipelines.registry import Pipeline, register_pipeline

#: Parameter counts of the reference configurations (paper Table 1: 22.1 M for the fine-tuning model;
#: the pretraining model adds the 4-block decoder, mask token and decoder positional MLP).
REFERENCE_PARAMS = {"pretrain": 29_006_432, "finetune_modelnet40": 22_099_752}


@dataclass
class PointMAEModelConfig:
    num_group: int = 64
    group_size: int = 32
    mask_ratio: float = 0.6
    dim: int = 384
    depth: int = 12
    heads: int = 6
    decoder_depth: int = 4
    decoder_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    embed_width: int = 128  # mini-PointNet widths w, 2w, 4w (128 in the paper)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 10
    min_lr: float = 1e-6


@dataclass
class SampleConfig:
    """Size of the embedded procedural sample written when no ``--data`` is given."""

    train_per_class: int = 16
    test_per_class: int = 8
    points: int = 2048


@dataclass
class PretrainConfig(RunConfig):
    num_points: int = 1024
    model: PointMAEModelConfig = field(default_factory=PointMAEModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class FinetuneConfig(RunConfig):
    pretrained: str = ""  # path of a pretraining checkpoint; empty: train from scratch
    dataset_variant: str = "pb_t50_rs"  # ScanObjectNN only: obj_bg | obj_only | pb_t50_rs
    num_points: int = 1024
    source_points: int = 8192  # points read per ModelNet40 file (the reference's N_POINTS)
    oversample: int = 1200  # training: FPS this many, keep a random num_points subset
    label_smoothing: float = 0.0
    head_dropout: float = 0.5
    vote_repeats: int = 0  # > 0: also report voting accuracy over this many random subsets
    fewshot_way: int = 0  # > 0: train/test on one N-way K-shot episode (seeded by `seed`)
    fewshot_shot: int = 10
    fewshot_query: int = 20
    model: PointMAEModelConfig = field(default_factory=PointMAEModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class SVMConfig(RunConfig):
    pretrained: str = ""  # empty: a randomly initialised encoder (seeded by `seed`), the control
    data_format: str = "text"  # text (modelnet40_normal_resampled) | h5 (modelnet40_ply_hdf5_2048)
    num_points: int = 1024
    source_points: int = 8192
    svm_c: float = 0.0093
    model: PointMAEModelConfig = field(default_factory=PointMAEModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ------------------------------------------------------------------------------------------- data
def _embedded(ctx: RunContext, layout: str, sample: SampleConfig, seed: int) -> Path:
    from threefold.datasets import procedural_objects as po

    root = ctx.run_dir / "data" / layout
    done = root / ".complete"
    if not done.is_file():
        writer = {"modelnet40": po.write_modelnet_layout, "shapenet55": po.write_shapenet_layout,
                  "scanobjectnn": po.write_scanobjectnn_layout}[layout]
        points = max(sample.points, 8192) if layout == "shapenet55" else sample.points
        writer(root, sample.train_per_class, sample.test_per_class, points, seed)
        done.write_text("ok\n")
    return root


def _data_root(ctx: RunContext, layout: str, sample: SampleConfig) -> Path:
    # The embedded sample does not depend on the run's seed: seeds compare models on one data set.
    root = ctx.data if ctx.data is not None else _embedded(ctx, layout, sample, 0)
    (ctx.run_dir / "data_path.txt").write_text(f"{root}\n")
    return root


def _modelnet_source(root: Path, cfg: FinetuneConfig | SVMConfig) -> int:
    """Points read per ModelNet40 file: the config's ``source_points``, capped for the embedded sample."""
    return min(cfg.source_points, cfg.sample.points) if (root / ".complete").is_file() else cfg.source_points


class ObjectDataModule(L.LightningDataModule):
    def __init__(self, train, test, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.test_set = train, test
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self):
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, seed=self.seed, drop_last=True,
                                   collate_fn=collate_objects, num_workers=self.num_workers)

    def _eval(self):
        return torch.utils.data.DataLoader(self.test_set, batch_size=self.batch_size, shuffle=False,
                                           collate_fn=collate_objects, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval()

    def test_dataloader(self):
        return self._eval()


def _check_batch(train_len: int, batch_size: int, what: str) -> None:
    if train_len < batch_size:
        raise ConfigError(f"{what}: trainer.batch_size={batch_size} exceeds the {train_len} training shapes "
                          "(batches are full: drop_last)")


# ---------------------------------------------------------------------------------------- modules
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The reference's ``add_weight_decay``: no decay on biases and 1-D (norm) parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(optimizer: torch.optim.Optimizer, o: dict[str, Any], epochs: int):
    """Per-epoch schedule of the reference's ``CosLR`` (timm ``CosineLRScheduler``): linear warm-up from
    ``min_lr`` over ``warmup_epochs``, then cosine from ``lr`` to ``min_lr`` over all ``epochs``."""
    lr, low, warm = o["lr"], o["min_lr"], o["warmup_epochs"]

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (low + (lr - low) * epoch / warm) / lr
        return (low + 0.5 * (lr - low) * (1 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _model_kwargs(m: dict[str, Any], *, decoder: bool) -> dict[str, Any]:
    keys = ["num_group", "group_size", "dim", "depth", "heads", "mlp_ratio", "drop_path", "embed_width"]
    if decoder:
        keys += ["mask_ratio", "decoder_depth", "decoder_heads"]
    return {k: m[k] for k in keys}


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # Masks depend on (seed, step) only, so a resumed run draws the masks the uninterrupted one would.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (1 << 63))


class PretrainModule(L.LightningModule):
    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.model = PointMAE(**_model_kwargs(hparams["config"]["model"], decoder=True))

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        points = batch["coord"]
        gen = _step_generator(self.hparams["config"]["seed"], self.global_step, points.device)
        loss = self.model(points, gen)["loss"]
        self.log("train_loss", loss, batch_size=points.shape[0])
        return loss

    def _held_out(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        points = batch["coord"]
        # Fixed held-out masks: seeded by the batch index, identical for every checkpoint and the baseline.
        out = self.model(points, _step_generator(12345, batch_idx, points.device))
        b, m = out["target"].shape[:2]
        k = self.model.group_size
        base = nearest_visible_patch(out["patches"], out["centers"], out["mask"])
        baseline = patch_chamfer_l2(base.reshape(b * m, k, 3), out["target"].reshape(b * m, k, 3))
        self.log(f"{prefix}_cdl2", out["loss"], batch_size=b, sync_dist=True)
        self.log(f"{prefix}_baseline_cdl2", baseline, batch_size=b, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._held_out(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._held_out(batch, batch_idx, "test")

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        opt = torch.optim.AdamW(_param_groups(self.model, o["weight_decay"]), lr=o["lr"])
        sched = _warmup_cosine(opt, o, self.hparams["config"]["trainer"]["max_epochs"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _fps_points(points: torch.Tensor, count: int) -> torch.Tensor:
    count = min(count, points.shape[1])
    return index_points(points, farthest_point_sampling(points, count))


class FinetuneModule(L.LightningModule):
    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        c = hparams["config"]
        self.model = PointMAEClassifier(hparams["num_classes"], head_dropout=c["head_dropout"],
                                        **_model_kwargs(c["model"], decoder=False))
        self.test_metrics = ClassificationMetrics(hparams["num_classes"])
        self.vote_metrics = ClassificationMetrics(hparams["num_classes"])

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        c = self.hparams["config"]
        points = _fps_points(batch["coord"], c["oversample"])
        gen = _step_generator(c["seed"], self.global_step, points.device)
        # Random subset after FPS oversampling (the reference's fine-tuning input sampling).
        keep = torch.rand(points.shape[:2], generator=gen, device=points.device).argsort(1)[:, : c["num_points"]]
        logits = self.model(index_points(points, keep))
        loss = torch.nn.functional.cross_entropy(logits, batch["category"], label_smoothing=c["label_smoothing"])
        self.log("train_loss", loss, batch_size=points.shape[0])
        self.log("train_acc", (logits.argmax(-1) == batch["category"]).float().mean(), batch_size=points.shape[0])
        return loss

    def _logits(self, points: torch.Tensor) -> torch.Tensor:
        return self.model(_fps_points(points, self.hparams["config"]["num_points"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self._logits(batch["coord"])
        self.log("val_acc", (logits.argmax(-1) == batch["category"]).float().mean(),
                 batch_size=logits.shape[0], sync_dist=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        c = self.hparams["config"]
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        # Under DDP the sampler pads with repeats; the accumulators sum across ranks, so skip them.
        real = batch_real_mask(loader.sampler, batch_idx, loader.batch_size, len(batch["category"]),
                               device=batch["coord"].device)
        points, target = batch["coord"][real], batch["category"][real]
        if len(target) == 0:
            return
        logits = self._logits(points)
        self.test_metrics.update(logits.argmax(-1), target)
        if c["vote_repeats"] > 0:
            gen = _step_generator(c["seed"] + 777, batch_idx, points.device)
            over = _fps_points(points, c["oversample"])
            total = torch.zeros_like(logits)
            for _ in range(c["vote_repeats"]):
                keep = torch.rand(over.shape[:2], generator=gen, device=points.device).argsort(1)[:, : c["num_points"]]
                total += self.model(index_points(over, keep))
            self.vote_metrics.update(total.argmax(-1), target)

    def on_test_epoch_end(self) -> None:
        # The accumulators sum their confusion matrices across ranks themselves: no sync_dist averaging.
        self.log("test_acc", self.test_metrics.compute()["accuracy"].float())
        with self.test_metrics.sync_context():
            conf = self.test_metrics.confmat.double()
        support = conf.sum(1)
        self.log("test_mean_class_acc", (conf.diagonal()[support > 0] / support[support > 0]).mean().float())
        if self.hparams["config"]["vote_repeats"] > 0:
            self.log("test_vote_acc", self.vote_metrics.compute()["accuracy"].float())
        self.test_metrics.reset()
        self.vote_metrics.reset()

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        opt = torch.optim.AdamW(_param_groups(self.model, o["weight_decay"]), lr=o["lr"])
        sched = _warmup_cosine(opt, o, self.hparams["config"]["trainer"]["max_epochs"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def pretrained_state(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a pretraining checkpoint: a Lightning ``.ckpt`` (``state_dict``) or a plain
    state dict (``model.pt`` / ``model.safetensors`` written by ``export_weights``)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"pretrained={path}: checkpoint file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    ckpt = load_checkpoint(p)
    return ckpt["state_dict"] if "state_dict" in ckpt else ckpt


# -------------------------------------------------------------------------------------- pipelines
@register_pipeline
class ShapeNetPointMAEPretrain(Pipeline):
    name = "shapenet-pointmae-pretrain"
    description = "Point-MAE masked-patch pretraining (Pang et al. 2022) on ShapeNet-55"
    config_class = PretrainConfig

    def run(self, cfg: PretrainConfig, ctx: RunContext) -> dict[str, Any]:
        seed_everything(cfg.seed)
        root = _data_root(ctx, "shapenet55", cfg.sample)
        augment = ScaleAndTranslate()
        train = ShapeNet55(root, "train", cfg.num_points, transform=augment, seed=cfg.seed)
        test = ShapeNet55(root, "test", cfg.num_points, seed=cfg.seed)
        _check_batch(len(train), cfg.trainer.batch_size, self.name)
        module = PretrainModule({"config": config_to_dict(cfg)})
        dm = ObjectDataModule(train, test, cfg.trainer.batch_size, cfg.trainer.num_workers, cfg.seed)
        trainer, metrics = _fit_test_export(ctx, module, dm)
        return {
            "pipeline": self.name,
            "dataset": "embedded-procedural" if ctx.data is None else "shapenet55",
            "seed": cfg.seed,
            **metrics,
            "params": count_parameters(module.model),
            "reference_params": REFERENCE_PARAMS["pretrain"],
            "global_step": int(trainer.global_step),
            "protocol": "held-out test split, fixed masks; baseline: nearest visible patch, re-centred",
        }

    def figures(self, cfg: PretrainConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, then masked input / reconstruction / ground truth of the first test shape of up to
        four categories, from the final checkpoint with masks drawn by the fixed held-out generator."""
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_points import plot_point_reconstructions

        paths = super().figures(cfg, run_dir, metrics)
        ckpt, data = run_dir / "checkpoints" / "last.ckpt", run_dir / "data_path.txt"
        if not (ckpt.is_file() and data.is_file()):
            return paths
        stored = load_checkpoint(ckpt)
        module = PretrainModule(stored["hyper_parameters"])
        module.load_state_dict(stored["state_dict"])
        model = module.model.eval()
        test = ShapeNet55(Path(data.read_text().strip()), "test", cfg.num_points, seed=cfg.seed)
        first: dict[str, int] = {}
        for i, name in enumerate(test.files):
            first.setdefault(name.split("-", 1)[0], i)
        batch = collate_objects([test[i] for i in list(first.values())[:4]])
        with torch.no_grad():
            out = model(batch["coord"], _step_generator(12345, 0, batch["coord"].device))
        visible, predicted, target, names = [], [], [], []
        for b, mask in enumerate(out["mask"]):
            centres = out["centers"][b]
            visible.append((out["patches"][b][~mask] + centres[~mask, None]).reshape(-1, 3).numpy())
            predicted.append((out["pred"][b] + centres[mask, None]).reshape(-1, 3).numpy())
            target.append((out["target"][b] + centres[mask, None]).reshape(-1, 3).numpy())
            cd = float(patch_chamfer_l2(out["pred"][b], out["target"][b]))
            names.append(f"{batch['name'][b]}, CD-L2 {cd:.4f}")
        caption = (f"Point-MAE masked point modelling on held-out shapes, final checkpoint (mask ratio "
                   f"{cfg.model.mask_ratio}, {cfg.model.num_group} patches x {cfg.model.group_size} points): masked input, "
                   "reconstruction, ground truth; visible points blue, masked orange; CD-L2 of the masked patches: "
                   + ", ".join(names))
        paths.append(plot_point_reconstructions(figures_dir(run_dir) / "reconstructions.png", visible, predicted,
                                                target, names, caption))
        return paths


def _fit_test_export(ctx: RunContext, module: L.LightningModule, dm: L.LightningDataModule) -> tuple[Any, dict[str, float]]:
    """Train, test the final model, export its weights (rank 0); the trainer and the ``test_*`` metrics."""
    trainer = ctx.fit(module, dm)
    trainer.test(module, datamodule=dm, verbose=False)
    if trainer.is_global_zero:
        ctx.export_weights(module.model)
    return trainer, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}


def _finetune_sets(cfg: FinetuneConfig, root: Path, dataset: str):
    """Training (augmented) and test sets of a fine-tuning run, few-shot episode applied."""
    augment = ScaleAndTranslate()
    if dataset == "modelnet40":
        src = _modelnet_source(root, cfg)
        train = ModelNet40(root, "train", src, transform=augment, seed=cfg.seed)
        test = ModelNet40(root, "test", src, seed=cfg.seed)
    else:
        train = ScanObjectNN(root, "train", cfg.dataset_variant, None, transform=augment, seed=cfg.seed)
        test = ScanObjectNN(root, "test", cfg.dataset_variant, None, seed=cfg.seed)
    if cfg.fewshot_way > 0:
        train, test = few_shot_episode(train, test, cfg.fewshot_way, cfg.fewshot_shot, cfg.fewshot_query, cfg.seed)
    return train, test


def _finetune_run(pipe: Pipeline, cfg: FinetuneConfig, ctx: RunContext, dataset: str) -> dict[str, Any]:
    seed_everything(cfg.seed)
    root = _data_root(ctx, dataset, cfg.sample)
    train, test = _finetune_sets(cfg, root, dataset)
    _check_batch(len(train), cfg.trainer.batch_size, pipe.name)
    module = FinetuneModule({"config": config_to_dict(cfg), "num_classes": train.num_classes})
    loaded = 0
    if cfg.pretrained:
        loaded = module.model.load_encoder(pretrained_state(cfg.pretrained), cfg.pretrained)
    dm = ObjectDataModule(train, test, cfg.trainer.batch_size, cfg.trainer.num_workers, cfg.seed)
    trainer, metrics = _fit_test_export(ctx, module, dm)
    return {
        "pipeline": pipe.name,
        "dataset": "embedded-procedural" if ctx.data is None else dataset,
        "seed": cfg.seed,
        **metrics,
        "pretrained": cfg.pretrained or None,
        "encoder_tensors_loaded": loaded,
        "params": count_parameters(module.model),
        "reference_params": REFERENCE_PARAMS["finetune_modelnet40"],
        "global_step": int(trainer.global_step),
        "fewshot": f"{cfg.fewshot_way}-way {cfg.fewshot_shot}-shot" if cfg.fewshot_way else None,
        "protocol": "single pass on FPS'd test clouds" + ("; test_vote_acc: voting, separate" if cfg.vote_repeats else ""),
    }


class ClassifierPredictor:
    """Inference entry point: ``predict(points (B, N, 3) float, unit-sphere normalised)`` -> ``(B,)`` int64
    classes, from ``num_points`` farthest-point samples of each cloud (single pass, no voting)."""

    def __init__(self, module: FinetuneModule) -> None:
        self.module = module.eval()

    @torch.no_grad()
    def predict(self, points: torch.Tensor) -> torch.Tensor:
        return self.module._logits(points).argmax(-1)


def _finetune_from_checkpoint(checkpoint: Path) -> FinetuneModule:
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt.get("hyper_parameters", {}) or "num_classes" not in ckpt["hyper_parameters"]:
        raise ConfigError(f"checkpoint {checkpoint} was not written by a Point-MAE fine-tuning pipeline")
    module = FinetuneModule(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


def per_class_figures(out_dir: Path, pred: np.ndarray, target: np.ndarray, class_names: list[str], what: str) -> list[Path]:
    """Per-class accuracy (recall) bars and the confusion matrix of (N,) int predictions and targets."""
    from threefold.pipelines.figures import plot_confusion_matrix, plot_per_class

    acc = ClassificationMetrics(len(class_names))
    acc.update(torch.as_tensor(pred), torch.as_tensor(target))
    conf = acc.confmat.double().numpy()
    support = conf.sum(1)
    recall = np.where(support > 0, conf.diagonal() / np.maximum(support, 1), np.nan)
    per_class = dict(zip(class_names, recall.tolist()))
    caption = (f"{what}: per-class test accuracy (recall), mean over present classes {np.nanmean(recall):.4f}, "
               f"overall {conf.diagonal().sum() / conf.sum():.4f}: "
               + ", ".join(f"{c} " + ("n/a" if np.isnan(r) else f"{r:.4f}") for c, r in per_class.items()))
    return [plot_per_class({"accuracy": per_class}, out_dir / "per_class_accuracy.png", caption=caption),
            plot_confusion_matrix(conf, out_dir / "confusion_matrix.png", class_names,
                                  caption=f"{what}: test confusion matrix (rows: ground truth, each row divided by "
                                          "its number of test shapes).")]


def predicted_split_figures(out_dir: Path, test: Any, predictor: ClassifierPredictor, accelerator: str, batch_size: int,
                            what: str) -> list[Path]:
    """Per-class accuracy and confusion matrix of ``predictor`` over the whole ``test`` split (an object
    dataset with ``class_names``), one pass of FPS'd clouds as ``test_acc``. Shared by the Point-MAE and
    I2P-MAE fine-tuning pipelines."""
    # the whole test split goes through FPS and the encoder again: on the run's GPU when it had one
    device = torch.device("cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    predictor.module.to(device)
    step = max(1, batch_size)
    preds, targets = [], []
    for start in range(0, len(test), step):
        batch = collate_objects([test[i] for i in range(start, min(len(test), start + step))])
        preds.append(predictor.predict(batch["coord"].to(device)).cpu())
        targets.append(batch["category"])
    return per_class_figures(out_dir, torch.cat(preds).numpy(), torch.cat(targets).numpy(), list(test.class_names), what)


def svm_figures(run_dir: Path, seed: int, pretrained: str, svm_c: Any) -> list[Path]:
    """Per-class test accuracy and confusion matrix of a linear SVM on frozen encoder features, and a PCA
    of the max-pooled test features coloured by class, from the run's ``svm_test.npz`` (none without it).
    Shared by the Point-MAE and I2P-MAE SVM pipelines."""
    from threefold.pipelines.figures import figures_dir, plot_embedding

    saved = run_dir / "svm_test.npz"
    if not saved.is_file():
        return []
    with np.load(saved) as f:
        x, y, pred, names = f["features"], f["labels"], f["pred"], [str(c) for c in f["class_names"]]
    encoder = f"pretrained encoder {pretrained}" if pretrained else f"randomly initialised encoder (seed {seed})"
    out = figures_dir(run_dir)
    paths = per_class_figures(out, pred, y, names, f"linear SVM (C={svm_c}) on the {encoder}")
    paths.append(plot_embedding(x, y.astype(np.int64), out / "embedding_pca.png", "pca", seed=seed, class_names=names,
                                caption=f"PCA of the frozen max-pooled test features ({len(y)} shapes, {encoder}), "
                                        "coloured by class."))
    return paths


class _FinetunePipeline(Pipeline):
    dataset = ""

    def test_split(self, cfg: FinetuneConfig, data_root: Path) -> Any:
        """The run's test split (object dataset with ``class_names``), read again for the figures."""
        return _finetune_sets(cfg, data_root, self.dataset)[1]

    def load(self, cfg: FinetuneConfig, checkpoint: Path) -> ClassifierPredictor:
        return ClassifierPredictor(_finetune_from_checkpoint(checkpoint))

    def figures(self, cfg: FinetuneConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, then per-class test accuracy and the confusion matrix of the final checkpoint
        (single pass on FPS'd test clouds, as ``test_acc``)."""
        from threefold.pipelines.figures import figures_dir

        paths = super().figures(cfg, run_dir, metrics)
        ckpt, data = run_dir / "checkpoints" / "last.ckpt", run_dir / "data_path.txt"
        if not (ckpt.is_file() and data.is_file()):
            return paths
        test = self.test_split(cfg, Path(data.read_text().strip()))
        return paths + predicted_split_figures(figures_dir(run_dir), test, self.load(cfg, ckpt), cfg.trainer.accelerator,
                                          cfg.trainer.batch_size, f"{self.name}, final checkpoint")


@register_pipeline
class ModelNet40PointMAEFinetune(_FinetunePipeline):
    dataset = "modelnet40"
    name = "modelnet40-pointmae-finetune"
    description = "Point-MAE fine-tuning for ModelNet40 classification (Pang et al. 2022)"
    config_class = FinetuneConfig

    def run(self, cfg: FinetuneConfig, ctx: RunContext) -> dict[str, Any]:
        return _finetune_run(self, cfg, ctx, "modelnet40")


@register_pipeline
class ScanObjectNNPointMAEFinetune(_FinetunePipeline):
    dataset = "scanobjectnn"
    name = "scanobjectnn-pointmae-finetune"
    description = "Point-MAE fine-tuning for ScanObjectNN (OBJ-BG / OBJ-ONLY / PB_T50_RS) classification"
    config_class = FinetuneConfig

    def run(self, cfg: FinetuneConfig, ctx: RunContext) -> dict[str, Any]:
        return _finetune_run(self, cfg, ctx, "scanobjectnn")


def _features(encoder: PointMAEEncoder, dataset, cfg: SVMConfig, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, cfg.trainer.batch_size), shuffle=False,
                                         collate_fn=collate_objects, num_workers=cfg.trainer.num_workers)
    feats, labels = [], []
    for batch in loader:
        points = _fps_points(batch["coord"].to(device), cfg.num_points)
        feats.append(max_pooled_features(encoder, points, cfg.model.num_group, cfg.model.group_size).cpu())
        labels.append(batch["category"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@register_pipeline
class ModelNet40PointMAESVM(Pipeline):
    name = "modelnet40-pointmae-svm"
    description = "Linear SVM on frozen max-pooled Point-MAE encoder features, ModelNet40"
    config_class = SVMConfig

    def run(self, cfg: SVMConfig, ctx: RunContext) -> dict[str, Any]:
        from sklearn.svm import SVC

        if cfg.data_format not in ("text", "h5"):
            raise ConfigError(f"data_format={cfg.data_format!r}, expected 'text' or 'h5'")
        seed_everything(cfg.seed)
        if cfg.data_format == "h5" and ctx.data is not None:
            root = ctx.data
            train, test = ModelNet40H5(root, "train", None), ModelNet40H5(root, "test", None)
        else:
            root = _data_root(ctx, "modelnet40", cfg.sample)
            src = _modelnet_source(root, cfg)
            train, test = ModelNet40(root, "train", src), ModelNet40(root, "test", src)
        m = asdict(cfg.model)
        encoder = PointMAEClassifier(train.num_classes, **_model_kwargs(m, decoder=False))
        if cfg.pretrained:
            encoder.load_encoder(pretrained_state(cfg.pretrained), cfg.pretrained)
        enc = encoder.encoder.eval()
        device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
                              else "cpu")
        enc.to(device)
        x_train, y_train = _features(enc, train, cfg, device)
        x_test, y_test = _features(enc, test, cfg, device)
        svm = SVC(kernel="linear", C=cfg.svm_c).fit(x_train, y_train)
        pred = svm.predict(x_test)
        acc = float((pred == y_test).mean())
        np.savez_compressed(ctx.run_dir / "svm_test.npz", features=x_test, labels=y_test, pred=pred,
                            class_names=np.asarray(test.class_names))
        result = {
            "pipeline": self.name,
            "dataset": "embedded-procedural" if ctx.data is None else "modelnet40",
            "seed": cfg.seed,
            "pretrained": cfg.pretrained or None,
            "svm_acc": acc,
            "svm_c": cfg.svm_c,
            "train_count": int(len(y_train)),
            "test_count": int(len(y_test)),
            "encoder_params": count_parameters(enc),
        }
        write_metrics(ctx.run_dir / "svm.json", result)
        return result

    def figures(self, cfg: SVMConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        return super().figures(cfg, run_dir, metrics) + svm_figures(run_dir, cfg.seed, cfg.pretrained, cfg.svm_c)
