"""``brats-multilevel``, ``brats-softmax``, ``brats-sigmoid``: hierarchical glioma segmentation.

Hu, Li, Zhao, Dong, Menze, Piraud, "Hierarchical multi-class segmentation of glioma images using
networks with multi-level activation function" (BrainLes 2018, arXiv 1810.09488): the residual U-Net
of Isensee et al. 2017 with (a) the multi-level activation head, nested WT ⊃ TC ⊃ ET by
construction, and the paper's baselines (b) a 4-class softmax and (c) three independent sigmoids.

Protocol: the cases of ``--data`` (layout ``brats2018`` | ``brats2023`` | ``msd``, detected when
``layout=auto``) are split into ``n_folds`` seeded folds and fold ``fold`` is held out
(``n_folds=5, fold=0`` is the 80/20 split). Each case is cropped to the brain box and z-scored per
modality inside the brain; training draws random patches (a fraction centred on tumour voxels), with
random mirroring, 90° rotations and per-channel intensity scale / shift. Held-out cases are predicted
whole by Gaussian-weighted sliding windows (50 % overlap, optional flip TTA) and scored per case with
Dice and HD95 (mm, header spacing, BraTS empty-mask rules) for WT / TC / ET, the nesting violations of
each prediction counted; per-case rows go to ``cases.csv`` and a summary (mean, median, std,
25 / 75 % percentiles) to ``metrics.json``. The intensity-threshold baseline (one threshold per region
on FLAIR or T1ce, tuned on the training cases) is scored on the same cases.

Without ``--data`` the embedded sample is generated: synthetic brain phantoms
(:mod:`threefold.datasets.brain_phantoms`) written in the BraTS 2018 layout under
``run_dir/data`` and read back by the real reader. They are synthetic, not MRI.

Distributed runs: Lightning's ``DistributedSampler`` gives every rank its own share of the epoch's
patch indices; held-out cases are spread over the ranks, the sampler's padding repeats are skipped
(:func:`~threefold.pipelines.metrics.distributed.batch_real_mask`), the accumulator sums across
ranks and the per-case rows are gathered, so every case is scored exactly once.

Augmentations are tensor / array ops here rather than MONAI transforms, so training runs where MONAI
is not installed (the GPU image); sliding-window inference uses MONAI.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from threefold.datasets.brain_phantoms import write_brats2018_phantoms
from threefold.datasets.brats import (
    MODALITIES,
    BraTS,
    list_cases,
    preprocess,
    read_case,
    uncrop,
    write_prediction,
)
from threefold.datasets.brats_prepare import preprocessed_case
from threefold.datasets.errors import ConfigError
from threefold.datasets.paths import safe_output_path
from threefold.datasets.splits import seed_everything
from threefold.medical.overlap import dice, hausdorff95
from threefold.medical.segmentation.heads import make_head
from threefold.medical.segmentation.inference import sliding_window_predict
from threefold.medical.segmentation.multilevel import REGIONS, nesting_violations, ordinal_to_regions
from threefold.medical.segmentation.threshold import apply_region_thresholds, fit_region_thresholds
from threefold.medical.segmentation.unet import Isensee2017UNet
from threefold.pipelines.config import RunConfig, config_from_dict, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint
from threefold.pipelines.metrics.distributed import batch_real_mask
from threefold.pipelines.metrics.volume import HD95_CONVENTIONS, SegmentationOverlapMetrics
from threefold.pipelines.registry import Pipeline, register_pipeline


HD95 = HD95_CONVENTIONS["directed"]  # the shared accumulator's key: MONAI's max of the directed HD95


@dataclass
class PhantomConfig:
    """Embedded synthetic sample (used when no ``--data`` is given)."""

    cases: int = 40
    shape: list[int] = field(default_factory=lambda: [48, 48, 48])


@dataclass
class PatchConfig:
    size: list[int] = field(default_factory=lambda: [32, 32, 32])  # paper / GPU: 128³
    per_epoch: int = 64  # patches drawn per epoch
    foreground_fraction: float = 0.5  # share of patches centred on a tumour voxel
    augment: bool = True


@dataclass
class UNetConfig:
    base_filters: int = 8  # paper: 16
    levels: int = 4  # paper: 5
    dropout: float = 0.3
    thresholds: list[float] = field(default_factory=lambda: [0.5, 1.5, 2.5])  # multi-level head only
    steepness: float = 4.0
    learnable_thresholds: bool = False
    dice_weight: float = 1.0
    bce_weight: float = 1.0  # cross-entropy for the softmax head
    mse_weight: float = 0.0  # multi-level head only: MSE of f(z) to y/3


@dataclass
class OptimConfig:
    lr: float = 5e-3
    weight_decay: float = 1e-5
    lr_decay: float = 0.985  # per epoch (Isensee 2017)


@dataclass
class InferenceConfig:
    overlap: float = 0.5
    flip_tta: bool = False
    sw_batch_size: int = 2


@dataclass
class BratsConfig(RunConfig):
    layout: str = "auto"  # auto | brats2018 | brats2023 | msd
    head: str = "multilevel"  # fixed by the pipeline name
    n_folds: int = 5
    fold: int = 0
    cache_cases: bool = True  # keep preprocessed cases in memory (about 50 MB per real BraTS case)
    cache_dir: str = ""  # preprocessed cases on disk (`threefold prepare brats --out CACHE`); "" = compute each run
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


# ----------------------------------------------------------------------------------------------- data


class PreprocessedCases:
    """Preprocessed samples of a case list, read on first use and optionally kept in memory; with
    ``cache_dir`` read from (or, on a miss, added to) the disk cache of ``threefold prepare brats``."""

    def __init__(self, dataset: BraTS, cache: bool, cache_dir: str | Path | None = None) -> None:
        self.dataset, self.cache, self.cache_dir = dataset, cache, cache_dir or None
        self._store: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if i in self._store:
            return self._store[i]
        sample = self.dataset[i] if self.cache_dir is None else preprocessed_case(self.dataset.cases[i], self.cache_dir)
        if self.cache:
            self._store[i] = sample
        return sample


def _crop_or_pad(array: np.ndarray, start: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Window ``[start, start + size)`` of the last three axes, zero-padded where it leaves the array."""
    spatial = np.asarray(array.shape[-3:])
    lo, hi = np.maximum(start, 0), np.minimum(start + np.asarray(size), spatial)
    out = np.zeros(array.shape[:-3] + tuple(size), array.dtype)
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out[(...,) + dst] = array[(...,) + src]
    return out


class PatchDataset(torch.utils.data.Dataset):
    """``per_epoch`` random training patches; item ``i`` of epoch ``e`` is a pure function of
    ``(seed, e, i)``, so runs repeat exactly whatever the worker count.

    Item: ``image`` (4, *size) float32 z-scored, ``label`` (*size) int64 ordinal.
    """

    def __init__(self, cases: PreprocessedCases, cfg: PatchConfig, seed: int) -> None:
        self.cases, self.cfg, self.seed = cases, cfg, seed
        self.size = tuple(int(s) for s in cfg.size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.cfg.per_epoch

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        sample = self.cases[int(rng.integers(len(self.cases)))]
        image, label = sample["image"], sample["label"]
        half = np.asarray(self.size) // 2
        fg = np.flatnonzero(label.ravel() > 0)
        if rng.random() < self.cfg.foreground_fraction and fg.size:
            centre = np.asarray(np.unravel_index(fg[rng.integers(fg.size)], label.shape))
        else:
            centre = np.asarray([rng.integers(n) for n in label.shape])
        start = centre - half
        image, label = _crop_or_pad(image, start, self.size), _crop_or_pad(label, start, self.size)
        if self.cfg.augment:
            for axis in (1, 2, 3):
                if rng.random() < 0.5:
                    image, label = np.flip(image, axis), np.flip(label, axis - 1)
            if len(set(self.size)) == 1:
                k, plane = int(rng.integers(4)), [(1, 2), (1, 3), (2, 3)][int(rng.integers(3))]
                image = np.rot90(image, k, plane)
                label = np.rot90(label, k, (plane[0] - 1, plane[1] - 1))
            scale = rng.uniform(0.9, 1.1, (4, 1, 1, 1))
            shift = rng.uniform(-0.1, 0.1, (4, 1, 1, 1))
            image = np.where(image != 0, image * scale + shift, 0.0)
        return {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "label": np.ascontiguousarray(label, dtype=np.int64),
        }


class _Whole(torch.utils.data.Dataset):
    """Whole preprocessed cases for evaluation (batch size 1: shapes differ)."""

    def __init__(self, cases: PreprocessedCases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        s = self.cases[i]
        return {"image": s["image"], "label": s["label"].astype(np.int64), "spacing": s["spacing"], "case": s["case"]}


class BratsDataModule(L.LightningDataModule):
    """Training patches of the training folds; whole held-out cases for ``test``."""

    def __init__(self, root: Path, cfg: BratsConfig) -> None:
        super().__init__()
        layout = None if cfg.layout == "auto" else cfg.layout
        common = dict(layout=layout, fold=cfg.fold, n_folds=cfg.n_folds, seed=cfg.seed)
        self.cfg = cfg
        self.train_cases = PreprocessedCases(BraTS(root, "train", **common), cfg.cache_cases, cfg.cache_dir)
        self.test_cases = PreprocessedCases(BraTS(root, "val", **common), cfg.cache_cases, cfg.cache_dir)
        self.patches = PatchDataset(self.train_cases, cfg.patch, cfg.seed)

    def train_dataloader(self):
        t = self.cfg.trainer
        return torch.utils.data.DataLoader(
            self.patches, batch_size=t.batch_size, shuffle=False, num_workers=t.num_workers, drop_last=True
        )

    def test_dataloader(self):
        return torch.utils.data.DataLoader(_Whole(self.test_cases), batch_size=1, num_workers=self.cfg.trainer.num_workers)


# --------------------------------------------------------------------------------------------- model


def _head_options(cfg: BratsConfig) -> dict[str, Any]:
    m = cfg.model
    if cfg.head == "multilevel":
        weights = {k: w for k, w in (("dice", m.dice_weight), ("bce", m.bce_weight), ("mse", m.mse_weight)) if w > 0}
        return dict(
            thresholds=tuple(m.thresholds), steepness=m.steepness, learnable_thresholds=m.learnable_thresholds, loss_weights=weights
        )
    if cfg.head == "softmax":
        return dict(dice_weight=m.dice_weight, ce_weight=m.bce_weight)
    if cfg.head == "sigmoid":
        return dict(dice_weight=m.dice_weight, bce_weight=m.bce_weight)
    raise ConfigError(f"head={cfg.head!r}: expected multilevel, softmax or sigmoid")


class GliomaSegmenter(L.LightningModule):
    """Isensee 2017 U-Net + one of the three heads; hyper-parameters are the plain config dict."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.cfg = config_from_dict(BratsConfig, hparams["config"])
        self.head = make_head(self.cfg.head, **_head_options(self.cfg))
        m = self.cfg.model
        self.net = Isensee2017UNet(len(MODALITIES), self.head.out_channels, m.base_filters, m.levels, m.dropout)
        self.overlap = SegmentationOverlapMetrics(list(REGIONS))
        self.rows: list[dict[str, Any]] = []
        self.example: dict[str, np.ndarray] = {}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 4, D, H, W) z-scored -> head scores (B, K, D, H, W)."""
        return self.head.scores(self.net(image))

    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Whole volume (1, 4, D, H, W) -> head scores by sliding windows of the training patch size."""
        inf = self.cfg.inference
        return sliding_window_predict(
            image, self.forward, self.cfg.patch.size, inf.overlap, inf.flip_tta, inf.sw_batch_size
        )

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, PatchDataset):
            dataset.epoch = self.current_epoch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(self.net(batch["image"]), batch["label"])
        self.log("train_loss", loss, batch_size=batch["image"].shape[0], prog_bar=True)
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        if not bool(batch_real_mask(loader.sampler, batch_idx, 1, 1)[0]):
            return  # a DistributedSampler's padding repeat: scored on another rank already
        scores = self.predict_volume(batch["image"])
        pred = self.head.regions(scores)
        target = ordinal_to_regions(batch["label"])
        spacing = batch["spacing"][0].tolist()
        self.overlap.update(pred, target, spacing)
        row = {"case": batch["case"][0], "nesting_violations": int(nesting_violations(pred)[0])}
        d, h = dice(pred, target)[0], hausdorff95(pred, target, spacing)[0]
        for k, region in enumerate(REGIONS):
            row[f"Dice/{region}"], row[f"{HD95}/{region}"] = float(d[k]), float(h[k])
        self.rows.append(row)
        if batch_idx == 0:  # one axial slice for the report: the one with the most tumour
            truth = batch["label"][0]
            k = int((truth > 0).flatten(0, 1).sum(0).argmax())
            self.example = {
                "case": np.asarray(batch["case"][0]),
                "flair": batch["image"][0, MODALITIES.index("flair"), :, :, k].float().cpu().numpy(),
                "t1ce": batch["image"][0, MODALITIES.index("t1ce"), :, :, k].float().cpu().numpy(),
                "truth": truth[:, :, k].cpu().numpy(),
                "pred": self.head.labels(scores)[0, :, :, k].cpu().numpy(),
                "slice": np.asarray(k),
            }

    def on_test_epoch_end(self) -> None:
        means = self.overlap.compute()
        for key, value in means.items():
            self.log(key, value.float(), batch_size=1, rank_zero_only=False)
        self.overlap.reset()

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.Adam(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, o.lr_decay)}


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-case rows of every rank (each held-out case is scored on exactly one rank)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part]
    return sorted(rows, key=lambda r: r["case"])


def summarize(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Mean, median, std and 25 / 75 % percentiles over cases of every numeric column."""
    out: dict[str, float] = {}
    for key in rows[0]:
        if key == "case":
            continue
        v = np.asarray([r[key] for r in rows], np.float64)
        stats = {"mean": v.mean(), "median": np.median(v), "std": v.std(), "p25": np.percentile(v, 25), "p75": np.percentile(v, 75)}
        if key == "nesting_violations":
            stats = {"total": v.sum(), "cases": float(np.sum(v > 0))}
        out.update({f"{prefix}{key}/{name}": float(s) for name, s in stats.items()})
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def threshold_baseline(dm: BratsDataModule) -> list[dict[str, Any]]:
    """Per-case rows of the FLAIR / T1ce intensity-threshold baseline tuned on the training cases."""
    train = [dm.train_cases[i] for i in range(len(dm.train_cases))]
    channels = [MODALITIES.index("flair"), MODALITIES.index("t1ce")]
    rules = fit_region_thresholds([s["image"] for s in train], [s["label"] for s in train], channels)
    rows = []
    for i in range(len(dm.test_cases)):
        s = dm.test_cases[i]
        pred = torch.from_numpy(apply_region_thresholds(s["image"], rules))[None]
        target = ordinal_to_regions(torch.from_numpy(s["label"].astype(np.int64))[None])
        d, h = dice(pred, target)[0], hausdorff95(pred, target, s["spacing"].tolist())[0]
        row = {"case": s["case"], "nesting_violations": int(nesting_violations(pred)[0])}
        for k, region in enumerate(REGIONS):
            row[f"Dice/{region}"], row[f"{HD95}/{region}"] = float(d[k]), float(h[k])
        rows.append(row)
    return rows


def build_module(cfg: BratsConfig) -> GliomaSegmenter:
    return GliomaSegmenter({"config": config_to_dict(cfg)})


def _module_from_checkpoint(checkpoint: Path) -> GliomaSegmenter:
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt.get("hyper_parameters", {}):
        raise ConfigError(f"checkpoint {checkpoint} was not written by a brats-* pipeline (no hyper_parameters.config)")
    module = GliomaSegmenter(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


class GliomaPredictor:
    """Inference entry point: ``predict(sample)`` for a raw sample of :func:`read_case` ->
    ordinal labels (I, J, K) uint8 in the sample's original grid."""

    def __init__(self, module: GliomaSegmenter) -> None:
        self.module = module.eval()

    @torch.no_grad()
    def predict(self, sample: dict) -> np.ndarray:
        pre = preprocess(sample)
        device = next(self.module.parameters()).device
        image = torch.from_numpy(pre["image"])[None].to(device)
        y = self.module.head.labels(self.module.predict_volume(image))[0].cpu().numpy().astype(np.uint8)
        return uncrop(y, pre["bbox"], sample["shape"])


class _BratsPipeline(Pipeline):
    head: str

    def _config(self, cfg: BratsConfig) -> BratsConfig:
        if cfg.head != self.head:
            if cfg.head != "multilevel":  # the schema default: set by the pipeline, not the user
                raise ConfigError(f"{self.name} uses head={self.head}; run brats-{cfg.head} for the {cfg.head} head")
            cfg.head = self.head
        return cfg

    def _data_root(self, cfg: BratsConfig, ctx: RunContext) -> Path:
        if ctx.data is not None:
            return ctx.data
        root = ctx.run_dir / "data"
        if not (root.is_dir() and any(root.iterdir())):
            write_brats2018_phantoms(root, cfg.phantom.cases, seed=cfg.seed, shape=tuple(cfg.phantom.shape))
        return root

    def _evaluate(self, module: GliomaSegmenter, dm: BratsDataModule, ctx: RunContext, trainer) -> dict[str, Any]:
        module.rows = []
        trainer.test(module, datamodule=dm, verbose=False)
        rows = _gather_rows(module.rows)
        metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        if trainer.is_global_zero:
            _write_csv(ctx.run_dir / "cases.csv", rows)
            if module.example:
                np.savez(ctx.run_dir / "example_slice.npz", **module.example)
        metrics.update(summarize(rows))
        base_rows = threshold_baseline(dm)
        if trainer.is_global_zero:
            _write_csv(ctx.run_dir / "cases_threshold_baseline.csv", base_rows)
        metrics.update(summarize(base_rows, prefix="threshold_baseline/"))
        return metrics

    def figures(self, cfg: BratsConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Loss curve and the mean Dice / HD95 bars of the shared accumulator, then one axial slice of
        the first held-out case: FLAIR (top row) and T1ce (bottom row), each alone, with the ground
        truth's and with the prediction's WT / TC / ET contours."""
        from threefold.pipelines.figures import default_figures, figures_dir, new_figure, save_figure

        per_region = {k: v for k, v in metrics.items() if k.count("/") == 1 and k.split("/")[0] in ("Dice", HD95)}
        paths = default_figures(run_dir, per_region)
        example = run_dir / "example_slice.npz"
        if not example.is_file():
            return paths
        ex = np.load(example)
        backgrounds = [("FLAIR", ex["flair"])] + ([("T1ce", ex["t1ce"])] if "t1ce" in ex.files else [])
        fig = new_figure((9.0, 3.2 * len(backgrounds)))
        # TC's outer border is ET's: a wider orange line stays visible under the red one
        colours = {"WT": ("tab:green", 1.2), "TC": ("tab:orange", 2.8), "ET": ("tab:red", 1.0)}
        axes = np.asarray(fig.subplots(len(backgrounds), 3)).reshape(len(backgrounds), 3)
        for row, (modality, image) in zip(axes, backgrounds):
            for ax, (title, labels) in zip(row, ((modality, None), (f"{modality}, ground truth", ex["truth"]),
                                                 (f"{modality}, {self.name}", ex["pred"]))):
                ax.imshow(image.T, cmap="gray", origin="lower")
                if labels is not None:
                    for level, (region, (colour, width)) in enumerate(colours.items(), start=1):
                        if np.any(labels >= level):
                            ax.contour((labels >= level).T.astype(float), levels=[0.5], colors=colour, linewidths=width)
                        ax.plot([], [], color=colour, label=region)
                    ax.legend(loc="lower right", fontsize=7)
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
        caption = (f"case {ex['case']}, axial slice k={int(ex['slice'])} (cropped grid): "
                   f"{' and '.join(m for m, _ in backgrounds)}, truth and prediction; WT green, TC orange, ET red")
        paths.append(save_figure(fig, figures_dir(run_dir) / "slice_case0.png", caption))
        return paths

    def run(self, cfg: BratsConfig, ctx: RunContext) -> dict[str, Any]:
        cfg = self._config(cfg)
        seed_everything(cfg.seed)
        root = self._data_root(cfg, ctx)
        dm = BratsDataModule(root, cfg)
        module = build_module(cfg)
        # Lightning's DistributedSampler gives each rank its own share of the epoch's patch indices
        trainer = ctx.fit(module, dm, limit_val_batches=0)
        if trainer.is_global_zero:
            ctx.export_weights(module.net)
        metrics = {
            "pipeline": self.name,
            "data": "synthetic brain phantoms (embedded sample)" if ctx.data is None else str(ctx.data),
            "layout": dm.train_cases.dataset.layout,
            "train_cases": len(dm.train_cases),
            "test_cases": len(dm.test_cases),
            "global_step": int(trainer.global_step),
            "seed": cfg.seed,
        }
        metrics.update(self._evaluate(module, dm, ctx, ctx.trainer(logger=False)))
        return metrics

    def evaluate(self, cfg: BratsConfig, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        module = _module_from_checkpoint(checkpoint)
        stored = module.cfg
        dm = BratsDataModule(self._data_root(stored, ctx), stored)
        metrics = {"pipeline": self.name, "checkpoint": str(checkpoint)}
        metrics.update(self._evaluate(module, dm, ctx, ctx.trainer(logger=False)))
        return metrics

    def load(self, cfg: BratsConfig, checkpoint: Path) -> GliomaPredictor:
        return GliomaPredictor(_module_from_checkpoint(checkpoint))

    def predict(self, cfg: BratsConfig, checkpoint: Path, input: Path, out: Path) -> None:
        """Write ``out/<case>.nii.gz`` for every case under ``input`` (any layout), in the input's
        geometry (affine, shape) and label convention — the form the BraTS submission portals take."""
        predictor = self.load(cfg, checkpoint)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for case in list_cases(input):  # the input's own layout, whatever the training data's was
            sample = read_case(case)
            # case names come from the input's folder names or its dataset.json: confined to out
            write_prediction(safe_output_path(out, f"{case.name}.nii.gz"), predictor.predict(sample), sample["affine"], case.layout)
            written.append(case.name)
        (out / "predictions.json").write_text(json.dumps({"pipeline": self.name, "cases": written}, indent=2) + "\n")


@register_pipeline
class BratsMultilevel(_BratsPipeline):
    name = "brats-multilevel"
    description = "Glioma WT/TC/ET segmentation, residual U-Net + multi-level activation (Hu et al. 2018)"
    config_class = BratsConfig
    head = "multilevel"


@register_pipeline
class BratsSoftmax(_BratsPipeline):
    name = "brats-softmax"
    description = "Glioma segmentation baseline: the same U-Net with a 4-class softmax head (Dice + CE)"
    config_class = BratsConfig
    head = "softmax"


@register_pipeline
class BratsSigmoid(_BratsPipeline):
    name = "brats-sigmoid"
    description = "Glioma segmentation baseline: the same U-Net with 3 independent region sigmoids (Dice + BCE)"
    config_class = BratsConfig
    head = "sigmoid"
