"""``semantickitti-rapidseg`` and ``semantickitti-minkunet``: LiDAR semantic segmentation on SemanticKITTI.

Li, Shum, Breckon, "RAPiD-Seg: Range-Aware Pointwise Distance Distribution Networks for 3D LiDAR
Segmentation" (ECCV 2024, arXiv 2407.10159). ``semantickitti-rapidseg`` trains R-RAPiD-Seg
(``model.variant=c`` for C-RAPiD-Seg, see below) in the paper's two stages; ``semantickitti-minkunet``
is the paper's ablation baseline, the same MinkUNet34 backbone, head, losses and recipe without RAPiD
(voxel means of x, y, z, remission as input).

Protocol: train on the train split (00-07, 09, 10; the sequences present), evaluate on ``eval.split``
(08) with per-class IoU and mIoU from the shared metric layer (official evaluator; ignore -1; both
``absent`` conventions reported), write the predictions in the submission format under
``run_dir/predictions/sequences/XX/predictions/NNNNNN.label``.

- RAPiD rows per scan (R-RAPiD: ring RoIs from elevation; C-RAPiD: ground-truth class RoIs) are
  computed once and cached on disk (:class:`~threefold.datasets.cache.FeatureCache`, keyed by the
  scan file and the feature parameters; ``features.cache_dir``, default ``run_dir/cache``; the caches
  of ``threefold prepare semantickitti --out CACHE`` are used as they are). RAPiD is
  invariant to rigid motions, so the rows are computed on the raw scan and kept through the
  augmentations.
- Augmentations (training): rotation about z, scaling, x/y flips, clipped jitter
  (:mod:`threefold.datasets.transforms`), then the ±``augment.crop`` metre box crop in x and y.
- Stage 1 (``ae.epochs`` epochs, Adam ``ae.lr``): the double-nested autoencoder(s) alone, MSE +
  λ·class-aware contrastive. Stage 2 (``trainer.max_epochs``): segmentation, weighted cross-entropy +
  Lovász-softmax, SGD (momentum 0.9, Nesterov) with ``optim.warmup_epochs`` of linear warm-up then
  cosine decay; the autoencoder frozen (``ae.mode=frozen``, the paper) or co-trained with weight
  ``ae.weight`` γ = 0.5 (``ae.mode=cotrain``). Each stage has its own sub-run (``stage1_ae/``,
  ``stage2_seg/``) and resumes from its ``last.ckpt`` with ``--resume``.
- C-RAPiD-Seg (``model.variant=c``) trains with ground-truth C-RAPiD rows; its evaluation and
  prediction run two passes, pseudo-labels from the R-RAPiD-Seg checkpoint named by
  ``model.r_checkpoint`` (a finished ``semantickitti-rapidseg`` run).

Without ``--data`` the synthetic sample (:func:`threefold.datasets.lidar_synthetic.generate_lidar_sample`,
options under ``sample.``) is generated into ``run_dir/data`` (needs open3d); pass ``--data`` to a
pre-generated copy on machines without open3d.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics.aggregation import SumMetric

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.semantickitti import (
    SEMANTICKITTI_CLASSES,
    SemanticKITTI,
    lidar_rings,
    read_scan,
    write_predictions,
)
from threefold.datasets.splits import seed_everything
from threefold.datasets.transforms import Compose, RandomFlip, RandomJitter, RandomRotateZ, RandomScale
from threefold.geometry.rapid.autoencoder import voxel_majority_label
from threefold.geometry.rapid.losses import segmentation_loss
from threefold.geometry.rapid.minkunet import MINKUNET34_CHANNELS, MINKUNET34_LAYERS
from threefold.geometry.rapid.rapidseg import PRECISIONS, RAPiDSeg
from threefold.pipelines.config import RunConfig, config_from_dict, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint
from threefold.pipelines.loaders import ResumableDataLoader
from threefold.pipelines.metrics.distributed import batch_real_mask
from threefold.pipelines.metrics.segmentation import SemanticSegmentationMetrics
from threefold.pipelines.registry import Pipeline, register_pipeline

NUM_CLASSES = len(SEMANTICKITTI_CLASSES)


@dataclass
class SampleConfig:
    """Embedded synthetic sample (without ``--data``)."""

    sequences: list[str] = field(default_factory=lambda: ["00", "01", "02", "08"])
    scans_per_sequence: int = 4
    n_beams: int = 64
    azimuth_step_deg: float = 0.16  # 0.16: ~118k points per scan; 1.0: ~20k
    seed: int = 0


@dataclass
class FeatureConfig:
    """RAPiD rows (:func:`threefold.geometry.rapid.features.rapid_features`)."""

    k: list[int] = field(default_factory=lambda: [10, 7, 5])
    ranges: list[float] = field(default_factory=lambda: [20.0, 35.0])
    delta: float = 0.9
    k_max: int = 10
    n_beams: int = 64  # ring estimation from elevation
    cache_dir: str = ""  # default: run_dir/cache


@dataclass
class AugmentConfig:
    enabled: bool = True
    crop: float = 35.2  # metres: training keeps |x|, |y| <= crop; 0 disables
    rotate: bool = True
    scale: list[float] = field(default_factory=lambda: [0.95, 1.05])
    flip: bool = True
    jitter_sigma: float = 0.01
    jitter_clip: float = 0.05


@dataclass
class ModelConfig:
    variant: str = "r"  # r | c (semantickitti-rapidseg); fixed to none by semantickitti-minkunet
    voxel_size: float = 0.05
    width: float = 1.0
    layers: list[int] = field(default_factory=lambda: list(MINKUNET34_LAYERS))
    channels: list[int] = field(default_factory=lambda: list(MINKUNET34_CHANNELS))
    stem_kernel: int = 5
    stream_channels: int = 32
    latents: int = 8
    dim: int = 64
    inner_dim: int = 16
    se_reduction: int = 8
    contrastive_weight: float = 0.1
    alpha_pos: float = 0.9
    alpha_neg: float = 0.5
    max_anchors: int = 4096
    lovasz_weight: float = 1.0
    class_weighting: str = "inverse_sqrt"  # none | inverse_sqrt (of the training label frequencies)
    r_checkpoint: str = ""  # C variant: the R-RAPiD-Seg checkpoint that gives pass-1 pseudo-labels


@dataclass
class AEConfig:
    epochs: int = 10
    lr: float = 1.0e-3
    mode: str = "frozen"  # frozen (paper) | cotrain
    weight: float = 0.5  # γ of the co-trained autoencoder loss


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 1.0e-3
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    split: str = "val"
    write_predictions: bool = True
    # inference precision of evaluation and prediction: fp32 (default, any device) or fp16 (CUDA only:
    # RAPiDSeg.predict under a float16 autocast, about 2.7x faster for MinkUNet34 on an H100)
    precision: str = "fp32"


@dataclass
class RapidSegConfig(RunConfig):
    sample: SampleConfig = field(default_factory=SampleConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------- data


def compute_rapid(coord: np.ndarray, remission: np.ndarray, roi: np.ndarray, f: FeatureConfig) -> np.ndarray:
    """RAPiD rows ``(N, k_max)`` float32 of one scan for RoIs ``roi (N,)``."""
    from threefold.geometry.rapid.features import rapid_features

    return np.asarray(rapid_features(coord, remission, roi, k=tuple(f.k), ranges=tuple(f.ranges), delta=f.delta,
                                     k_max=f.k_max), np.float32)


class RapidRows:
    """Per-scan R-RAPiD (and ground-truth C-RAPiD) rows from the caches of
    :mod:`threefold.geometry.rapid.prepare` under ``cache_root`` (the ones ``threefold prepare
    semantickitti`` fills), computed and stored on a miss."""

    def __init__(self, cfg: FeatureConfig, cache_root: Path) -> None:
        self.cfg, self.root = cfg, cache_root
        self.params = dict(k=tuple(cfg.k), ranges=tuple(cfg.ranges), delta=cfg.delta, k_max=cfg.k_max, workers=-1)

    def r_rows(self, item: dict[str, Any]) -> np.ndarray:
        from threefold.geometry.rapid.prepare import r_rapid_rows

        return r_rapid_rows(self.root, item["path"], n_beams=self.cfg.n_beams, **self.params)

    def c_rows(self, item: dict[str, Any], label_path: Path) -> np.ndarray:
        from threefold.geometry.rapid.prepare import c_rapid_rows

        return c_rapid_rows(self.root, item["path"], label_path, **self.params)


def _augmentation(a: AugmentConfig) -> Compose:
    ts: list[Any] = []
    if a.rotate:
        ts.append(RandomRotateZ())
    if a.scale and a.scale[0] != a.scale[1]:
        ts.append(RandomScale(a.scale[0], a.scale[1]))
    if a.flip:
        ts.append(RandomFlip(0.5, (0, 1)))
    if a.jitter_sigma > 0:
        ts.append(RandomJitter(a.jitter_sigma, a.jitter_clip))
    return Compose(ts)


class ScanDataset(torch.utils.data.Dataset):
    """SemanticKITTI scans with their RAPiD rows; training items are augmented and cropped.

    Item: ``coord (N, 3)`` float32 metres, ``remission (N,)``, ``rapid (N, k_max)``, optional
    ``crapid (N, k_max)`` and ``label (N,)`` int64, ``sequence``, ``frame``. Item ``i`` of epoch ``e``
    is a pure function of ``(seed, e, i)``.
    """

    def __init__(self, scans: SemanticKITTI, rows: RapidRows | None, train: bool, augment: AugmentConfig,
                 c_rapid: bool, seed: int) -> None:
        self.scans, self.rows, self.train, self.augment, self.c_rapid, self.seed = scans, rows, train, augment, c_rapid, seed
        self.transform = _augmentation(augment)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.scans[i]
        out = {"coord": item["coord"], "remission": item["remission"], "sequence": item["sequence"], "frame": item["frame"]}
        if "label" in item:
            out["label"] = item["label"]
        if self.rows is not None:
            out["rapid"] = torch.from_numpy(self.rows.r_rows(item))
            if self.c_rapid:
                out["crapid"] = torch.from_numpy(self.rows.c_rows(item, self.scans.label_path(Path(item["path"]))))
        if self.train and self.augment.enabled:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            out = self.transform(out, g)
            if self.augment.crop > 0:
                keep = (out["coord"][:, :2].abs() <= self.augment.crop).all(1)
                out = {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out


def collate_scans(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate scans: point tensors ``(ΣN, ...)``, ``batch (ΣN,)`` int64, ``num_points`` list."""
    out: dict[str, Any] = {"batch": torch.cat([torch.full((len(it["coord"]),), b, dtype=torch.long) for b, it in enumerate(items)])}
    for key in ("coord", "remission", "rapid", "crapid", "label"):
        if key in items[0]:
            out[key] = torch.cat([it[key] for it in items]).float() if key != "label" else torch.cat([it[key] for it in items])
    out["sequence"] = [it["sequence"] for it in items]
    out["frame"] = [it["frame"] for it in items]
    out["num_points"] = [len(it["coord"]) for it in items]
    return out


class _TrainData(L.LightningDataModule):
    """The training loader of one stage (Lightning asks a datamodule for it at fit time)."""

    def __init__(self, make_loader: Any) -> None:
        super().__init__()
        self.make_loader = make_loader

    def train_dataloader(self) -> ResumableDataLoader:
        return self.make_loader()


def class_weights(scans: SemanticKITTI, mode: str) -> list[float]:
    """Per-class CE weights from the training label frequencies f_c: ``(1 / sqrt(f_c))`` normalised to
    mean 1 over the classes present (absent classes get 0: they never occur as targets)."""
    if mode == "none":
        return [1.0] * NUM_CLASSES
    if mode != "inverse_sqrt":
        raise ConfigError(f"model.class_weighting={mode!r}: expected none or inverse_sqrt")
    counts = np.zeros(NUM_CLASSES, np.float64)
    for i in range(len(scans)):
        lab = scans[i]["label"].numpy()
        counts += np.bincount(lab[lab >= 0], minlength=NUM_CLASSES)
    present = counts > 0
    w = np.zeros(NUM_CLASSES)
    w[present] = 1.0 / np.sqrt(counts[present] / counts.sum())
    w[present] /= w[present].mean()
    return w.tolist()


# --------------------------------------------------------------------------------------------- model


def build_network(cfg: RapidSegConfig) -> RAPiDSeg:
    m = cfg.model
    ae_kwargs = dict(contrastive_weight=m.contrastive_weight, alpha_pos=m.alpha_pos, alpha_neg=m.alpha_neg, max_anchors=m.max_anchors)
    return RAPiDSeg(NUM_CLASSES, m.variant, m.voxel_size, m.width, tuple(m.layers), tuple(m.channels), m.stem_kernel,
                    m.stream_channels, m.latents, m.dim, m.inner_dim, cfg.features.k_max, m.se_reduction, ae_kwargs)


class RapidSegModule(L.LightningModule):
    """RAPiD-Seg / MinkUNet in one of two stages (``hparams["stage"]``: ``"ae"`` or ``"seg"``)."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.cfg = config_from_dict(RapidSegConfig, hparams["config"])
        self.stage = hparams["stage"]
        self.net = build_network(self.cfg)
        self.register_buffer("class_weights", torch.tensor(hparams.get("class_weights", [1.0] * NUM_CLASSES), dtype=torch.float32))
        self.metrics = SemanticSegmentationMetrics(NUM_CLASSES, SEMANTICKITTI_CLASSES, absent="zero")
        self.metrics_skip = SemanticSegmentationMetrics(NUM_CLASSES, SEMANTICKITTI_CLASSES, absent="skip")
        # evaluated scans and points, summed across ranks (float64: exact up to 2^53 points)
        self.scans_scored, self.points_scored = SumMetric().set_dtype(torch.float64), SumMetric().set_dtype(torch.float64)
        self.prediction_root: Path | None = None
        self.eval_counts: dict[str, int] = {}
        self.r_model: RAPiDSeg | None = None  # C variant: pass-1 model
        self._aes = self.net.autoencoders()
        if self.stage == "seg" and self.cfg.ae.mode == "frozen":
            for ae in self._aes:
                ae.requires_grad_(False)
        if self.stage == "ae":
            # Stage 1 trains the autoencoders alone; the rest of the network takes no part in the loss.
            # Trainable parameters outside the loss make DDP fail at its second step (it waits for their
            # gradients), so they are frozen here; a single process trains exactly as before.
            self.net.requires_grad_(False)
            for ae in self._aes:
                ae.requires_grad_(True)

    @property
    def frozen_ae(self) -> bool:
        return self.cfg.ae.mode == "frozen"

    def _ae_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grid = self.net.voxelize(batch["coord"], batch["batch"])
        labels = voxel_majority_label(batch["label"], grid.inverse, grid.num_voxels, NUM_CLASSES) if "label" in batch else None
        g = torch.Generator(device=batch["coord"].device).manual_seed(self.cfg.seed * 100003 + int(self.global_step))
        total, parts = batch["coord"].new_zeros(()), {}
        for name, ae in zip(("rapid", "crapid"), self._aes):
            loss, _, p = ae.loss(batch[name], grid.offset, grid.inverse, grid.indices, grid.table, labels, g)
            total = total + loss
            parts.update({f"{name}_{k}": v for k, v in p.items()})
        return total, parts

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch["coord"], batch["remission"], batch["batch"], batch.get("rapid"), batch.get("crapid"),
                        frozen_ae=self.frozen_ae)

    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, ScanDataset):
            dataset.epoch = self.current_epoch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        n = len(batch["num_points"])
        if self.stage == "ae":
            loss, parts = self._ae_loss(batch)
            self.log_dict({f"ae/{k}": v for k, v in parts.items()}, batch_size=n)
            self.log("train_loss", loss, batch_size=n, prog_bar=True)
            return loss
        logits = self(batch)
        loss, parts = segmentation_loss(logits, batch["label"], self.class_weights, self.cfg.model.lovasz_weight)
        if self._aes and self.cfg.ae.mode == "cotrain":
            ae_loss, _ = self._ae_loss(batch)
            loss = loss + self.cfg.ae.weight * ae_loss
            parts["ae"] = ae_loss.detach()
        self.log_dict({f"seg/{k}": v for k, v in parts.items()}, batch_size=n)
        self.log("train_loss", loss, batch_size=n, prog_bar=True)
        return loss

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Point labels ``(ΣN,)`` int64; the C variant runs its two passes. ``eval.precision: fp16``
        (CUDA only) runs the network(s) through :meth:`RAPiDSeg.predict` under a float16 autocast;
        fp32 (the default) calls them directly, as before the key existed."""
        precision = self.cfg.eval.precision
        if precision not in PRECISIONS:
            raise ConfigError(f"eval.precision={precision!r}: expected one of {PRECISIONS}")
        half = precision != "fp32"
        if half and batch["coord"].device.type != "cuda":
            raise ConfigError(f"eval.precision={precision!r} needs CUDA, but the batch is on {batch['coord'].device} "
                              "(spconv's CPU kernels are float32); set eval.precision=fp32 or trainer.accelerator=gpu")
        if self.net.variant == "c":
            if self.r_model is None:
                raise ConfigError("C-RAPiD-Seg evaluation needs model.r_checkpoint (an R-RAPiD-Seg checkpoint) for pass 1")
            from threefold.geometry.rapid.rapidseg import two_pass_c_rapid

            f = self.cfg.features
            fn = lambda c, r, lab: torch.from_numpy(compute_rapid(c.cpu().numpy(), r.cpu().numpy(), lab.cpu().numpy(), f))  # noqa: E731
            logits = two_pass_c_rapid(self.r_model, self.net, batch["coord"], batch["remission"], batch["batch"], batch["rapid"], fn,
                                      precision=precision if half else None)
        elif half:
            logits = self.net.predict(batch["coord"], batch["remission"], batch["batch"], batch.get("rapid"),
                                      batch.get("crapid"), precision=precision)
        else:
            logits = self(batch)
        return logits.argmax(1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Under DDP Lightning's DistributedSampler pads the scan list to a multiple of the world size
        # by repeating scans; those repeats are scored on their own rank already: keep them out of
        # the confusion matrix (summed across ranks) and of the submission files.
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        real = batch_real_mask(loader.sampler, batch_idx, loader.batch_size, len(batch["num_points"]))
        if not bool(real.any()):
            return
        pred = self.predict_batch(batch)
        point_real = real.to(batch["batch"].device)[batch["batch"]]
        self.scans_scored.update(real.sum().double())
        self.points_scored.update(point_real.sum().double())
        if "label" in batch:
            self.metrics.update(pred[point_real], batch["label"][point_real])
            self.metrics_skip.update(pred[point_real], batch["label"][point_real])
        if self.prediction_root is not None:
            for b, (seq, frame) in enumerate(zip(batch["sequence"], batch["frame"])):
                if bool(real[b]):
                    write_predictions(self.prediction_root, seq, frame, pred[batch["batch"] == b].cpu())

    def on_test_epoch_end(self) -> None:
        # compute() syncs across ranks (a collective): every rank calls it, also one that scored no
        # labelled point, so an early return may only depend on the summed count
        self.eval_counts = {"eval_scans_scored": int(self.scans_scored.compute()),
                            "eval_points": int(self.points_scored.compute())}
        self.scans_scored.reset()
        self.points_scored.reset()
        labelled = self.metrics.confmat.sum().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            labelled = self.all_gather(labelled).sum()
        if int(labelled.sum()) == 0:
            return
        values = {**self.metrics.compute(), **{k: v for k, v in self.metrics_skip.compute().items() if k.startswith("mIoU")}}
        for key, value in values.items():
            self.log(key, value.float(), batch_size=1, rank_zero_only=False)
        self.metrics.reset()
        self.metrics_skip.reset()

    def configure_optimizers(self):
        if self.stage == "ae":
            return torch.optim.Adam([p for ae in self._aes for p in ae.parameters()], lr=self.cfg.ae.lr)
        o = self.cfg.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            raise ConfigError(f"optim.name={o.name!r}: expected sgd or adamw")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs)
        warm = int(round(o.warmup_epochs * per_epoch))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm  # linear warm-up from lr / warm
            t = (step - warm) / max(1, total - warm)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _module_from_checkpoint(checkpoint: Path) -> RapidSegModule:
    ckpt = load_checkpoint(checkpoint)
    hp = ckpt.get("hyper_parameters", {})
    if "config" not in hp or "stage" not in hp:
        raise ConfigError(f"checkpoint {checkpoint} was not written by semantickitti-rapidseg / -minkunet (no hyper_parameters.config)")
    module = RapidSegModule(hp)
    module.load_state_dict(ckpt["state_dict"])
    if module.net.variant == "c":
        r_ckpt = module.cfg.model.r_checkpoint
        if not r_ckpt:
            raise ConfigError(f"checkpoint {checkpoint} is C-RAPiD-Seg: set model.r_checkpoint to the R-RAPiD-Seg checkpoint for pass 1")
        module.r_model = _module_from_checkpoint(Path(r_ckpt)).net.eval()
    return module.eval()


# ------------------------------------------------------------------------------------------ pipeline


class _RapidSegPipeline(Pipeline):
    config_class = RapidSegConfig
    variants: tuple[str, ...]

    def _config(self, cfg: RapidSegConfig) -> RapidSegConfig:
        if cfg.model.variant not in self.variants:  # the shipped YAML sets the pipeline's own variant
            raise ConfigError(f"{self.name}: model.variant={cfg.model.variant!r}; expected one of {self.variants}")
        if cfg.ae.mode not in ("frozen", "cotrain"):
            raise ConfigError(f"ae.mode={cfg.ae.mode!r}: expected frozen or cotrain")
        if cfg.eval.precision not in PRECISIONS:
            raise ConfigError(f"eval.precision={cfg.eval.precision!r}: expected one of {PRECISIONS}")
        return cfg

    def _data_root(self, cfg: RapidSegConfig, ctx: RunContext) -> Path:
        if ctx.data is not None:
            return ctx.data
        from threefold.datasets.lidar_synthetic import generate_lidar_sample

        s = cfg.sample
        return generate_lidar_sample(ctx.run_dir / "data", tuple(s.sequences), s.scans_per_sequence, s.seed, s.n_beams,
                                     s.azimuth_step_deg)

    def _rows(self, cfg: RapidSegConfig, ctx_dir: Path) -> RapidRows | None:
        if cfg.model.variant == "none":
            return None
        return RapidRows(cfg.features, Path(cfg.features.cache_dir) if cfg.features.cache_dir else ctx_dir / "cache")

    def _eval_loader(self, cfg: RapidSegConfig, root: Path, rows: RapidRows | None) -> torch.utils.data.DataLoader:
        scans = SemanticKITTI(root, cfg.eval.split, n_beams=cfg.features.n_beams)
        ds = ScanDataset(scans, rows, False, cfg.augment, False, cfg.seed)
        return torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, collate_fn=collate_scans,
                                           num_workers=cfg.trainer.num_workers)

    def _evaluate(self, module: RapidSegModule, cfg: RapidSegConfig, root: Path, rows: RapidRows | None, ctx: RunContext) -> dict[str, Any]:
        loader = self._eval_loader(cfg, root, rows)
        module.prediction_root = ctx.run_dir / "predictions" if cfg.eval.write_predictions else None
        trainer = ctx.trainer(logger=False)
        trainer.test(module, dataloaders=loader, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("mIoU", "IoU/", "accuracy"))}
        metrics.update(module.eval_counts)  # scans and points scored, summed over ranks
        metrics["eval_world_size"] = int(trainer.world_size)
        metrics["eval_scans"] = len(loader.dataset)
        metrics["eval_split"] = cfg.eval.split
        return metrics

    def run(self, cfg: RapidSegConfig, ctx: RunContext) -> dict[str, Any]:
        cfg = self._config(cfg)
        seed_everything(cfg.seed)
        root = self._data_root(cfg, ctx)
        rows = self._rows(cfg, ctx.run_dir)
        train_scans = SemanticKITTI(root, "train", with_labels=True, n_beams=cfg.features.n_beams)
        weights = class_weights(train_scans, cfg.model.class_weighting)
        c_rapid = cfg.model.variant == "c"
        train_set = ScanDataset(train_scans, rows, True, cfg.augment, c_rapid, cfg.seed)
        t = cfg.trainer

        def loader() -> ResumableDataLoader:
            return ResumableDataLoader(train_set, batch_size=t.batch_size, seed=cfg.seed, drop_last=False,
                                       collate_fn=collate_scans, num_workers=t.num_workers)

        hparams = {"config": config_to_dict(cfg), "class_weights": weights}
        module = RapidSegModule({**hparams, "stage": "seg"})
        info: dict[str, Any] = {"pipeline": self.name, "variant": cfg.model.variant, "seed": cfg.seed,
                                "data": "synthetic LiDAR sample (embedded)" if ctx.data is None else str(ctx.data),
                                "train_scans": len(train_scans),
                                "parameters": sum(p.numel() for p in module.net.parameters())}
        if module.net.autoencoders() and cfg.ae.epochs > 0:  # stage 1: the autoencoder(s) alone
            ae_module = RapidSegModule({**hparams, "stage": "ae"})
            ae_ctx = ctx.child("stage1_ae")
            ae_trainer = ae_ctx.fit(ae_module, _TrainData(loader), max_epochs=cfg.ae.epochs, max_steps=-1, limit_val_batches=0)
            module.net.load_state_dict(ae_module.net.state_dict())
            info["ae_steps"] = int(ae_trainer.global_step)
            info.update({k: float(v) for k, v in ae_trainer.callback_metrics.items() if k.startswith("ae/")})
        seg_ctx = ctx.child("stage2_seg")
        trainer = seg_ctx.fit(module, _TrainData(loader), limit_val_batches=0)
        info["global_step"] = int(trainer.global_step)
        if trainer.is_global_zero:
            ctx.export_weights(module.net)
        if c_rapid:
            if not cfg.model.r_checkpoint:
                info["note"] = "C-RAPiD-Seg trained; set model.r_checkpoint to evaluate it (two passes)"
                return info
            module.r_model = _module_from_checkpoint(Path(cfg.model.r_checkpoint)).net.eval()
        info.update(self._evaluate(module.eval(), cfg, root, rows, ctx))
        return info

    def figures(self, cfg: RapidSegConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves and per-class IoU bars, then bird's-eye / range views (prediction, ground truth, error;
        official colours) and the confusion matrix of the first scan of ``eval.split``
        (:func:`~threefold.pipelines.figures_lidar.plot_lidar_views`), read back from the submission
        files the evaluation wrote (no second forward pass; nothing more when there are none)."""
        from threefold.datasets.semantickitti import read_labels, semantickitti_config
        from threefold.pipelines.figures import default_figures
        from threefold.pipelines.figures_lidar import plot_lidar_views

        # only the IoU family is per class (metrics also hold the autoencoder's "ae/<loss>" terms)
        paths = default_figures(run_dir, {k: v for k, v in metrics.items() if k.startswith("IoU/")})
        data = run_dir / "data_path.txt"  # written by `threefold run --data`; else the embedded sample
        root = Path(data.read_text().strip()) if data.is_file() else run_dir / "data"
        if not root.is_dir():
            return paths
        scans = SemanticKITTI(root, cfg.eval.split, n_beams=cfg.features.n_beams)
        if len(scans) == 0 or not scans.with_labels:
            return paths
        item = scans[0]
        seq, frame = item["sequence"], item["frame"]
        pred_file = run_dir / "predictions" / "sequences" / seq / "predictions" / f"{frame}.label"
        if not pred_file.is_file():
            return paths
        coord = item["coord"].numpy()
        pred = read_labels(pred_file, len(coord))  # raw ids back to classes 0..18
        c = semantickitti_config()
        return paths + plot_lidar_views(run_dir, coord, pred, item["label"].numpy(), c["color_map"],
                                        c["learning_map_inv"], name=f"seq{seq}_{frame}", labels=c["labels"],
                                        learning_ignore=c["learning_ignore"])

    def _inference_precision(self, module: RapidSegModule, cfg: RapidSegConfig) -> RapidSegModule:
        """The invoking config's ``eval.precision`` (not the one stored with the checkpoint's training run)."""
        if cfg.eval.precision not in PRECISIONS:
            raise ConfigError(f"eval.precision={cfg.eval.precision!r}: expected one of {PRECISIONS}")
        module.cfg.eval.precision = cfg.eval.precision
        return module

    def evaluate(self, cfg: RapidSegConfig, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        module = self._inference_precision(_module_from_checkpoint(checkpoint), cfg)
        stored = module.cfg
        root = self._data_root(stored, ctx)
        metrics = {"pipeline": self.name, "checkpoint": str(checkpoint)}
        metrics.update(self._evaluate(module, stored, root, self._rows(stored, ctx.run_dir), ctx))
        return metrics

    def load(self, cfg: RapidSegConfig, checkpoint: Path) -> "RapidSegPredictor":
        return RapidSegPredictor(self._inference_precision(_module_from_checkpoint(checkpoint), cfg))

    def predict(self, cfg: RapidSegConfig, checkpoint: Path, input: Path, out: Path) -> None:
        """Write ``out/sequences/XX/predictions/NNNNNN.label`` for one ``.bin`` or, given a
        SemanticKITTI root, for every scan of the test sequences 11-21 present under it."""
        predictor = self.load(cfg, checkpoint)
        input, out = Path(input), Path(out)
        if input.is_file():
            if input.suffix != ".bin":
                raise DataFormatError(f"{input}: expected a SemanticKITTI .bin scan or a dataset root")
            seq = input.parent.parent.name if input.parent.name == "velodyne" and input.parent.parent.name.isdigit() else "00"
            scans = [(seq, input.stem, input)]
        elif input.is_dir():
            from threefold.datasets.semantickitti import SPLITS, list_scans

            scans = list_scans(input, SPLITS["test"])
            if not scans:
                raise MissingFileError(f"{input}: no scans of the test sequences 11-21 (sequences/XX/velodyne/NNNNNN.bin)")
        else:
            raise MissingFileError(f"{input} does not exist")
        written = []
        for seq, frame, path in scans:
            labels = predictor.predict_file(path)
            written.append(str(write_predictions(out, seq, frame if frame.isdigit() else "0", labels)))
        (out / "predictions.json").write_text(json.dumps({"pipeline": self.name, "files": written}, indent=2) + "\n")


class RapidSegPredictor:
    """Inference entry point: ``predict_file(bin_path)`` → labels ``(N,)`` int64 in 0..18."""

    def __init__(self, module: RapidSegModule) -> None:
        self.module = module.eval()

    @torch.no_grad()
    def predict_scan(self, coord: np.ndarray, remission: np.ndarray) -> np.ndarray:
        f = self.module.cfg.features
        device = next(self.module.parameters()).device
        batch: dict[str, Any] = {"coord": torch.from_numpy(coord).float().to(device),
                                 "remission": torch.from_numpy(remission).float().to(device),
                                 "batch": torch.zeros(len(coord), dtype=torch.long, device=device), "num_points": [len(coord)]}
        if self.module.net.variant != "none":
            ring = np.asarray(lidar_rings(coord, f.n_beams))
            batch["rapid"] = torch.from_numpy(compute_rapid(coord, remission, ring, f)).to(device)
        return self.module.predict_batch(batch).cpu().numpy()

    def predict_file(self, path: Path) -> np.ndarray:
        scan = read_scan(path)
        return self.predict_scan(scan["coord"], scan["remission"])


@register_pipeline
class SemanticKittiRapidSeg(_RapidSegPipeline):
    name = "semantickitti-rapidseg"
    description = "LiDAR semantic segmentation, R/C-RAPiD-Seg: RAPiD features + double-nested AE + MinkUNet34 (Li et al. 2024)"
    variants = ("r", "c")


@register_pipeline
class SemanticKittiMinkUNet(_RapidSegPipeline):
    name = "semantickitti-minkunet"
    description = "LiDAR semantic segmentation baseline: MinkUNet34 on voxel means, RAPiD-Seg's recipe without RAPiD"
    variants = ("none",)


__all__ = ["RapidSegConfig", "RapidSegModule", "RapidSegPredictor", "ScanDataset", "collate_scans"]
