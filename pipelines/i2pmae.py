"""I2P-MAE pipelines (Zhang et al., "Learning 3D Representations from 2D Pre-trained Models via
Image-to-Point Masked Autoencoders", CVPR 2023): ``shapenet-i2pmae-pretrain``, ``modelnet40-i2pmae-svm``,
``scanobjectnn-i2pmae-finetune`` and ``modelnet40-i2pmae-finetune``.

Recipes (the reference's ``cfgs/``, shipped as ``pipelines/configs/<name>.yaml``):

* pretraining (``pre-training/i2p-mae.yaml``): ShapeNet-55 train split, 2048 points per shape,
  scale-and-translate augmentation, 512 / 256 / 64 tokens of 16 / 8 / 8, dims 96 / 192 / 384, 5 blocks
  per scale, 6 heads, drop-path 0.1, 2D-guided mask ratio 0.8, decoder [1, 1], frozen CLIP ViT-B/16
  teacher (``teacher.checkpoint``; without one a small random ViT stands in, for the demo), AdamW lr 1e-3
  wd 0.05, batch 64, 10 warm-up epochs then cosine over **300** epochs (the reference config's
  ``max_epoch`` is 300 but its scheduler is told 400; the schedule here ends where training ends).
  Validation/test: held-out masked Chamfer-L2 at the 256-token scale with fixed masks, next to the
  nearest-visible-token baseline on the same masks, and the 2D-feature MSE.
* fine-tuning: AdamW lr 5e-4 wd 0.05, 10 warm-up + cosine over 300 epochs, batch 32, gradient clip 10;
  ScanObjectNN PB_T50_RS 2048 points, group sizes [32, 16, 16], local radii [0.48, 0.96, 1.92],
  mean ‖ max pooling; ModelNet40 1024 points, [48, 24, 24], radii [0.24, 0.48, 0.96], mean + max
  pooling, label smoothing 0.2 (the reference's: 1 − ε on the class, ε / (C − 1) elsewhere).
* SVM: max-pooled top-scale features of the frozen pretraining encoder,
  ``SVC(kernel="linear", C=0.0093)`` for ModelNet40 (1024 points) and C = 0.018 for ScanObjectNN.

Without ``--data`` each pipeline writes the embedded procedural sample in its dataset's layout under
``<run>/data`` and reads it back with the real reader (shared with the Point-MAE pipelines).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from threefold.datasets.errors import ConfigError
from threefold.datasets.objects import (
    ModelNet40,
    ModelNet40H5,
    ScaleAndTranslate,
    ScanObjectNN,
    ShapeNet55,
    collate_objects,
)
from threefold.datasets.splits import seed_everything
from threefold.geometry.i2pmae import (
    I2PMAE,
    HierarchicalEncoder,
    I2PMAEClassifier,
    Teacher2D,
    i2pmae_features,
    load_clip_teacher,
    nearest_visible_members,
    random_teacher,
)
from threefold.geometry.neighbors import index_points
from threefold.geometry.pointmae import count_parameters, patch_chamfer_l2
from threefold.pipelines.config import RunConfig, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint, write_metrics
from threefold.pipelines.metrics import ClassificationMetrics
from threefold.pipelines.metrics.distributed import batch_real_mask
from threefold.pipelines.pointmae import (
    ClassifierPredictor,
    ObjectDataModule,
    OptimConfig,
    SampleConfig,
    _check_batch,
    _FinetunePipeline as _PointMAEFinetunePipeline,
    _data_root,
    _fit_test_export,
    _fps_points,
    _modelnet_source,
    _param_groups,
    _step_generator,
    _warmup_cosine,
    pretrained_state,
    svm_figures,
)
from threefold.pipelines.registry import Pipeline, register_pipeline

#: Parameter counts of the reference configurations: the paper's 12.9 M is the fine-tuned model
#: (hierarchical encoder + head; 12,921,935 for the 15-class ScanObjectNN head here); the pretraining
#: model adds the decoder and both reconstruction heads (C = 512 CLIP features).
REFERENCE_PARAMS = {"finetune_paper": 12_900_000}


@dataclass
class I2PMAEModelConfig:
    num_groups: list[int] = field(default_factory=lambda: [512, 256, 64])
    group_sizes: list[int] = field(default_factory=lambda: [16, 8, 8])
    dims: list[int] = field(default_factory=lambda: [96, 192, 384])
    depths: list[int] = field(default_factory=lambda: [5, 5, 5])
    heads: int = 6
    mask_ratio: float = 0.8
    decoder_depths: list[int] = field(default_factory=lambda: [1, 1])
    decoder_up_blocks: list[int] = field(default_factory=lambda: [1])
    drop_path: float = 0.1
    mlp_ratio: float = 4.0
    embed_width: int = 128  # scale-0 mini-PointNet widths w, 2w, 4w (128 in the reference)


@dataclass
class TeacherConfig:
    """The frozen 2D teacher: a CLIP checkpoint the user supplies, else a small random ViT (demo/tests)."""

    checkpoint: str = ""  # CLIP ViT-B/16 state dict (open_clip / OpenAI / timm layout); empty: random ViT
    act: str = "quick_gelu"  # quick_gelu (OpenAI weights) | gelu (open_clip LAION weights)
    trust_torchscript: bool = False  # load an OpenAI TorchScript archive (it carries code: trusted files only)
    random_width: int = 64
    random_layers: int = 2
    random_heads: int = 4
    random_output_dim: int = 512  # CLIP ViT-B/16's feature dimension, so the model has the reference's shape
    random_seed: int = 0


@dataclass
class PretrainConfig(RunConfig):
    num_points: int = 2048
    model: I2PMAEModelConfig = field(default_factory=I2PMAEModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class FinetuneModelConfig:
    num_groups: list[int] = field(default_factory=lambda: [512, 256, 64])
    group_sizes: list[int] = field(default_factory=lambda: [32, 16, 16])
    radii: list[float] = field(default_factory=lambda: [0.48, 0.96, 1.92])
    dims: list[int] = field(default_factory=lambda: [96, 192, 384])
    depths: list[int] = field(default_factory=lambda: [5, 5, 5])
    heads: int = 6
    drop_path: float = 0.1
    mlp_ratio: float = 4.0
    embed_width: int = 128
    pooling: str = "concat"  # concat (ScanObjectNN head) | sum (ModelNet40 head)


@dataclass
class FinetuneConfig(RunConfig):
    pretrained: str = ""  # path of a shapenet-i2pmae-pretrain checkpoint; empty: from scratch
    dataset_variant: str = "pb_t50_rs"  # ScanObjectNN only
    num_points: int = 2048
    source_points: int = 8192  # ModelNet40: points read per file
    oversample: int = 2048  # training: FPS this many, keep a random num_points subset
    label_smoothing: float = 0.0
    head_dropout: float = 0.5
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class SVMConfig(RunConfig):
    pretrained: str = ""  # empty: a randomly initialised encoder (seeded by `seed`), the control
    dataset: str = "modelnet40"  # modelnet40 | scanobjectnn
    dataset_variant: str = "obj_bg"  # ScanObjectNN only (the reference's linear-svm/scan_obj-bg.yaml)
    data_format: str = "text"  # ModelNet40: text (modelnet40_normal_resampled) | h5 (modelnet40_ply_hdf5_2048)
    num_points: int = 1024
    source_points: int = 8192
    svm_c: float | None = None  # None: 0.0093 (ModelNet40) or 0.018 (ScanObjectNN), the reference's values
    model: I2PMAEModelConfig = field(default_factory=I2PMAEModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


SVM_C = {"modelnet40": 0.0093, "scanobjectnn": 0.018}


# ---------------------------------------------------------------------------------------- modules
def build_teacher(t: dict[str, Any]) -> Teacher2D:
    """The frozen teacher of a ``teacher`` config section."""
    if t["checkpoint"]:
        return load_clip_teacher(t["checkpoint"], t["act"], t.get("trust_torchscript", False))
    return random_teacher(t["random_seed"], t["random_width"], t["random_layers"], t["random_heads"],
                          t["random_output_dim"])


def _pretrain_kwargs(m: dict[str, Any]) -> dict[str, Any]:
    keys = ["num_groups", "group_sizes", "dims", "depths", "heads", "mask_ratio", "decoder_depths",
            "decoder_up_blocks", "drop_path", "mlp_ratio", "embed_width"]
    return {k: m[k] for k in keys}


class PretrainModule(L.LightningModule):
    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        c = hparams["config"]
        self.model = I2PMAE(build_teacher(c["teacher"]), **_pretrain_kwargs(c["model"]))

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        points = batch["coord"]
        out = self.model(points, _step_generator(self.hparams["config"]["seed"], self.global_step, points.device))
        b = points.shape[0]
        self.log("train_loss", out["loss"], batch_size=b)
        self.log("train_loss_3d", out["loss_3d"], batch_size=b)
        self.log("train_loss_2d", out["loss_2d"], batch_size=b)
        return out["loss"]

    def _held_out(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        points = batch["coord"]
        # Fixed held-out masks (seeded by the batch index): the same for every checkpoint and the baseline.
        out = self.model(points, _step_generator(12345, batch_idx, points.device))
        t = self.model.target_scale
        base = nearest_visible_members(out["scales"][t], out["masks"][t])
        b = points.shape[0]
        self.log(f"{prefix}_cdl2", out["loss_3d"], batch_size=b, sync_dist=True)
        self.log(f"{prefix}_baseline_cdl2", patch_chamfer_l2(base, out["target_3d"]), batch_size=b, sync_dist=True)
        self.log(f"{prefix}_loss_2d", out["loss_2d"], batch_size=b, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._held_out(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._held_out(batch, batch_idx, "test")

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        opt = torch.optim.AdamW(_param_groups(self.model, o["weight_decay"]), lr=o["lr"])
        sched = _warmup_cosine(opt, o, self.hparams["config"]["trainer"]["max_epochs"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _classifier(c: dict[str, Any], num_classes: int) -> I2PMAEClassifier:
    m = c["model"]
    return I2PMAEClassifier(num_classes, m["num_groups"], m["group_sizes"], m["dims"], m["depths"], m["heads"],
                            m["radii"], m["drop_path"], m["mlp_ratio"], m["embed_width"], m["pooling"],
                            c["head_dropout"])


def reference_smoothing(eps: float, num_classes: int) -> float:
    """torch ``label_smoothing`` equal to the reference's ``smooth_loss`` (1 − ε on the true class,
    ε / (C − 1) on the others): ε · C / (C − 1)."""
    return eps * num_classes / (num_classes - 1) if num_classes > 1 else 0.0


class FinetuneModule(L.LightningModule):
    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.model = _classifier(hparams["config"], hparams["num_classes"])
        self.test_metrics = ClassificationMetrics(hparams["num_classes"])

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        c = self.hparams["config"]
        points = _fps_points(batch["coord"], c["oversample"])
        gen = _step_generator(c["seed"], self.global_step, points.device)
        keep = torch.rand(points.shape[:2], generator=gen, device=points.device).argsort(1)[:, : c["num_points"]]
        logits = self.model(index_points(points, keep))
        smoothing = reference_smoothing(c["label_smoothing"], self.hparams["num_classes"])
        loss = torch.nn.functional.cross_entropy(logits, batch["category"], label_smoothing=smoothing)
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
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        real = batch_real_mask(loader.sampler, batch_idx, loader.batch_size, len(batch["category"]),
                               device=batch["coord"].device)
        points, target = batch["coord"][real], batch["category"][real]
        if len(target):
            self.test_metrics.update(self._logits(points).argmax(-1), target)

    def on_test_epoch_end(self) -> None:
        self.log("test_acc", self.test_metrics.compute()["accuracy"].float())
        self.test_metrics.reset()

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        opt = torch.optim.AdamW(_param_groups(self.model, o["weight_decay"]), lr=o["lr"])
        sched = _warmup_cosine(opt, o, self.hparams["config"]["trainer"]["max_epochs"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def pretraining_encoder(m: dict[str, Any]) -> HierarchicalEncoder:
    """A bare encoder shaped like :class:`I2PMAE`'s for a model config (the SVM's feature extractor)."""
    enc = HierarchicalEncoder(m["dims"], m["depths"], m["heads"], m["mlp_ratio"], m["drop_path"], m["embed_width"])
    for s in range(len(m["dims"]) - len(m["decoder_depths"])):
        enc.norms[s] = torch.nn.Identity()  # as I2PMAE: norms of scales below the decoder do not exist
    return enc


def load_pretraining_encoder(enc: HierarchicalEncoder, state: dict[str, torch.Tensor], source: str) -> int:
    """Copy ``[model.]encoder.*`` of an I2P-MAE pretraining state dict into ``enc`` (strict)."""
    own = enc.state_dict()
    found = {}
    for key, value in state.items():
        for p in ("model.encoder.", "encoder."):
            if key.startswith(p):
                found[key[len(p):]] = value
                break
    bad = sorted(set(own) ^ set(found)) + [k for k in own if k in found and own[k].shape != found[k].shape]
    if not found or bad:
        raise ConfigError(f"{source}: encoder weights do not fit this model ({bad[:3] or 'no encoder.* weights'}); "
                          "model widths/depths must equal the pretraining config's")
    enc.load_state_dict(found)
    return len(found)


# -------------------------------------------------------------------------------------- pipelines
@register_pipeline
class ShapeNetI2PMAEPretrain(Pipeline):
    name = "shapenet-i2pmae-pretrain"
    description = "I2P-MAE pretraining (Zhang et al. 2023): 2D-guided masking, 3D + 2D-feature targets, ShapeNet-55"
    config_class = PretrainConfig

    def run(self, cfg: PretrainConfig, ctx: RunContext) -> dict[str, Any]:
        seed_everything(cfg.seed)
        root = _data_root(ctx, "shapenet55", cfg.sample)
        train = ShapeNet55(root, "train", cfg.num_points, transform=ScaleAndTranslate(), seed=cfg.seed)
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
            "teacher": cfg.teacher.checkpoint or f"random ViT (seed {cfg.teacher.random_seed})",
            "params": count_parameters(module.model),
            "encoder_params": count_parameters(module.model.encoder),
            "global_step": int(trainer.global_step),
            "protocol": "held-out test split, fixed 2D-guided masks; CD-L2 of masked 256-scale tokens' members; "
                        "baseline: members of the nearest visible token, re-centred",
        }

    def figures(self, cfg: PretrainConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, then for the first held-out test shape, from the final checkpoint: its three depth
        views (:func:`project_views`; the summed splatted depth recovered as ``logit`` of the
        de-normalised image) with the 2D-guided saliency (the teacher's [CLS] attention of each view
        upsampled bicubically to 224², the map :func:`center_saliency` reads at the top-scale centres);
        then masked input / reconstruction / ground truth at the target scale of the first test shape
        of up to four categories (mask of the held-out generator, as ``test_cdl2``)."""
        from threefold.geometry.i2pmae.projection import IMAGENET_MEAN, IMAGENET_STD, project_views
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_points import plot_depth_views, plot_point_reconstructions

        paths = super().figures(cfg, run_dir, metrics)
        ckpt, data = run_dir / "checkpoints" / "last.ckpt", run_dir / "data_path.txt"
        if not (ckpt.is_file() and data.is_file()):
            return paths
        stored = load_checkpoint(ckpt)
        module = PretrainModule(stored["hyper_parameters"])
        module.load_state_dict(stored["state_dict"])
        model = module.model.eval()
        test = ShapeNet55(Path(data.read_text().strip()), "test", cfg.num_points, seed=cfg.seed)
        batch = collate_objects([test[0]])
        points, name = batch["coord"], batch["name"][0]
        with torch.no_grad():
            out = model(points, _step_generator(12345, 0, points.device))
            images, _ = project_views(points)  # (3 views, 1, 3, S, S), ImageNet-normalised sigmoid(depth)
            _, attn = model.teacher(images[:, 0])  # (3, h, w)
        size = images.shape[-1]
        saliency = torch.nn.functional.interpolate(attn.float().unsqueeze(1), size=(size, size), mode="bicubic",
                                                   align_corners=False)[:, 0]
        # the three channels are equal: undo channel 0's normalisation, then the sigmoid
        depth = torch.logit((images[:, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(1e-6, 1 - 1e-6))
        top = len(out["masks"]) - 1
        visible_top = int((~out["masks"][top][0]).sum())
        paths += plot_depth_views(
            run_dir, depth.numpy(), saliency.numpy(), name="depth_views", view_names=("x-y", "z-x", "y-z"),
            caption=f"I2P-MAE on held-out shape {name}, final checkpoint: summed splatted depth of the three "
                    "orthographic views (x-y seen along z, z-x along y, y-z along x; no point: white) and the 2D "
                    f"teacher's [CLS] attention upsampled bicubically to {size}x{size} (the 2D-guided saliency; "
                    f"the mask keeps {visible_top} of {out['masks'][top].shape[1]} top-scale tokens visible, "
                    "drawn with softmax(saliency)).")
        # reconstructions: the first test shape of up to four categories (Point-MAE's figure), one batch
        first: dict[str, int] = {}
        for i, shape in enumerate(test.files):
            first.setdefault(shape.split("-", 1)[0], i)
        batch = collate_objects([test[i] for i in list(first.values())[:4]])
        with torch.no_grad():
            out = model(batch["coord"], _step_generator(12345, 0, batch["coord"].device))
        t = model.target_scale
        scale, visible, predicted, target, names = out["scales"][t], [], [], [], []
        start = 0  # pred_3d / target_3d hold the masked tokens of all shapes, row-major
        for b, mask in enumerate(out["masks"][t]):
            n = int(mask.sum())
            pred_b, target_b = out["pred_3d"][start:start + n], out["target_3d"][start:start + n]
            start += n
            visible.append(scale.neighborhood_abs[b][~mask].reshape(-1, 3).numpy())
            target.append(scale.neighborhood_abs[b][mask].reshape(-1, 3).numpy())
            predicted.append((pred_b + scale.centers[b][mask][:, None]).reshape(-1, 3).numpy())
            names.append(f"{batch['name'][b]}, CD-L2 {float(patch_chamfer_l2(pred_b, target_b)):.4f}")
        caption = (f"I2P-MAE masked point modelling on held-out shapes, final checkpoint, scale {t} "
                   f"({cfg.model.num_groups[t]} tokens x {cfg.model.group_sizes[t]} points; 2D-guided mask of the "
                   "held-out generator): masked input, reconstruction, ground truth; visible points blue, masked "
                   "orange; CD-L2 of the masked tokens: " + ", ".join(names))
        paths.append(plot_point_reconstructions(figures_dir(run_dir) / "reconstructions.png", visible, predicted,
                                                target, names, caption))
        return paths


def _finetune_sets(cfg: FinetuneConfig, root: Path, dataset: str):
    """Training (augmented) and test sets of a fine-tuning run."""
    augment = ScaleAndTranslate()
    if dataset == "modelnet40":
        src = _modelnet_source(root, cfg)
        return (ModelNet40(root, "train", src, transform=augment, seed=cfg.seed),
                ModelNet40(root, "test", src, seed=cfg.seed))
    return (ScanObjectNN(root, "train", cfg.dataset_variant, None, transform=augment, seed=cfg.seed),
            ScanObjectNN(root, "test", cfg.dataset_variant, None, seed=cfg.seed))


def _finetune_run(pipe: Pipeline, cfg: FinetuneConfig, ctx: RunContext, dataset: str) -> dict[str, Any]:
    seed_everything(cfg.seed)
    train, test = _finetune_sets(cfg, _data_root(ctx, dataset, cfg.sample), dataset)
    _check_batch(len(train), cfg.trainer.batch_size, pipe.name)
    module = FinetuneModule({"config": config_to_dict(cfg), "num_classes": train.num_classes})
    loaded = module.model.load_encoder(pretrained_state(cfg.pretrained), cfg.pretrained) if cfg.pretrained else 0
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
        "reference_params": REFERENCE_PARAMS["finetune_paper"],
        "global_step": int(trainer.global_step),
        "protocol": "single pass on FPS'd test clouds",
    }


class _FinetunePipeline(_PointMAEFinetunePipeline):
    """Point-MAE's fine-tuning pipeline shape (figures of the final checkpoint on the test split) with
    I2P-MAE's data sets and checkpoints."""

    dataset: str

    def test_split(self, cfg: FinetuneConfig, data_root: Path) -> Any:
        return _finetune_sets(cfg, data_root, self.dataset)[1]

    def load(self, cfg: FinetuneConfig, checkpoint) -> ClassifierPredictor:
        ckpt = load_checkpoint(checkpoint)
        hp = ckpt.get("hyper_parameters", {})
        if "config" not in hp or "num_classes" not in hp or "radii" not in hp["config"].get("model", {}):
            raise ConfigError(f"checkpoint {checkpoint} was not written by an I2P-MAE fine-tuning pipeline")
        module = FinetuneModule(hp)
        module.load_state_dict(ckpt["state_dict"])
        return ClassifierPredictor(module)


@register_pipeline
class ScanObjectNNI2PMAEFinetune(_FinetunePipeline):
    dataset = "scanobjectnn"
    name = "scanobjectnn-i2pmae-finetune"
    description = "I2P-MAE fine-tuning with local attention, ScanObjectNN (PB_T50_RS / OBJ-BG / OBJ-ONLY)"
    config_class = FinetuneConfig

    def run(self, cfg: FinetuneConfig, ctx: RunContext) -> dict[str, Any]:
        return _finetune_run(self, cfg, ctx, "scanobjectnn")


@register_pipeline
class ModelNet40I2PMAEFinetune(_FinetunePipeline):
    dataset = "modelnet40"
    name = "modelnet40-i2pmae-finetune"
    description = "I2P-MAE fine-tuning with local attention, ModelNet40 (label smoothing 0.2)"
    config_class = FinetuneConfig

    def run(self, cfg: FinetuneConfig, ctx: RunContext) -> dict[str, Any]:
        return _finetune_run(self, cfg, ctx, "modelnet40")


def _features(enc: HierarchicalEncoder, dataset, cfg: SVMConfig, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, cfg.trainer.batch_size), shuffle=False,
                                         collate_fn=collate_objects, num_workers=cfg.trainer.num_workers)
    feats, labels = [], []
    for batch in loader:
        points = _fps_points(batch["coord"].to(device), cfg.num_points)
        feats.append(i2pmae_features(enc, points, cfg.model.num_groups, cfg.model.group_sizes).cpu())
        labels.append(batch["category"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@register_pipeline
class ModelNet40I2PMAESVM(Pipeline):
    name = "modelnet40-i2pmae-svm"
    description = "Linear SVM on frozen max-pooled I2P-MAE features (ModelNet40 C=0.0093; dataset=scanobjectnn C=0.018)"
    config_class = SVMConfig

    def run(self, cfg: SVMConfig, ctx: RunContext) -> dict[str, Any]:
        from sklearn.svm import SVC

        if cfg.dataset not in SVM_C:
            raise ConfigError(f"dataset={cfg.dataset!r}, expected one of {sorted(SVM_C)}")
        if cfg.data_format not in ("text", "h5"):
            raise ConfigError(f"data_format={cfg.data_format!r}, expected 'text' or 'h5'")
        seed_everything(cfg.seed)
        if cfg.dataset == "scanobjectnn":
            root = _data_root(ctx, "scanobjectnn", cfg.sample)
            variant = cfg.dataset_variant if ctx.data is not None else "pb_t50_rs"  # the embedded sample's only variant
            train = ScanObjectNN(root, "train", variant, None)
            test = ScanObjectNN(root, "test", variant, None)
        elif cfg.data_format == "h5" and ctx.data is not None:
            train, test = ModelNet40H5(ctx.data, "train", None), ModelNet40H5(ctx.data, "test", None)
        else:
            root = _data_root(ctx, "modelnet40", cfg.sample)
            src = _modelnet_source(root, cfg)
            train, test = ModelNet40(root, "train", src), ModelNet40(root, "test", src)
        enc = pretraining_encoder(asdict(cfg.model))
        if cfg.pretrained:
            load_pretraining_encoder(enc, pretrained_state(cfg.pretrained), cfg.pretrained)
        device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
                              else "cpu")
        enc = enc.eval().to(device)
        x_train, y_train = _features(enc, train, cfg, device)
        x_test, y_test = _features(enc, test, cfg, device)
        c = cfg.svm_c if cfg.svm_c is not None else SVM_C[cfg.dataset]
        svm = SVC(kernel="linear", C=c).fit(x_train, y_train)
        pred = svm.predict(x_test)
        acc = float((pred == y_test).mean())
        np.savez_compressed(ctx.run_dir / "svm_test.npz", features=x_test, labels=y_test, pred=pred,
                            class_names=np.asarray(test.class_names))
        result = {
            "pipeline": self.name,
            "dataset": ("embedded-procedural-" if ctx.data is None else "") + cfg.dataset,
            "seed": cfg.seed,
            "pretrained": cfg.pretrained or None,
            "svm_acc": acc,
            "svm_c": c,
            "train_count": int(len(y_train)),
            "test_count": int(len(y_test)),
            "encoder_params": count_parameters(enc),
        }
        write_metrics(ctx.run_dir / "svm.json", result)
        return result

    def figures(self, cfg: SVMConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        return super().figures(cfg, run_dir, metrics) + svm_figures(run_dir, cfg.seed, cfg.pretrained, metrics.get("svm_c"))
