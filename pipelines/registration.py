"""``hcp-nestedmorph``, ``hcp-voxelmorph``, ``hcp-classical``: deformable T1w → b0 registration.

NestedMorph (Marthi et al., WACV 2025, arXiv 2410.02550; :mod:`threefold.medical.registration.nestedmorph`)
and its baselines on one protocol:

- ``hcp-nestedmorph``: NestedMorph trained unsupervised with ``-LNCC²(window 9) + λ‖∇u‖²`` (λ = 1,
  penalty on the flow), Adam with amsgrad, lr 1e-4, polynomial decay (power 0.9) over the run;
  ``model.diffeomorphic=true`` integrates a stationary velocity field (7 squarings).
- ``hcp-voxelmorph``: MONAI's ``VoxelMorph`` (Balakrishnan et al. 2019, default vxm UNet) with the
  same loss, optimiser, data and metrics (diffeomorphic when ``model.diffeomorphic=true``, else
  ``integration_steps=0``).
- ``hcp-classical``: no training; every test pair is registered by the SimpleITK baseline
  :func:`threefold.medical.registration.classical.register_classical`.

Data: with ``--data`` the HCP reader (:class:`threefold.datasets.hcp.HCPRegistration`: T1w affinely
pre-aligned to the mean b0 by Mattes MI, resampled to ``data.size``³, min–max to [0, 1]); without it
the embedded synthetic sample (:class:`threefold.datasets.registration_phantoms.RegistrationPhantoms`,
T1-like → b0-like pairs with a known diffeomorphic deformation and tissue labels; synthetic, not MRI).

Every test pair is scored by :func:`threefold.pipelines.metrics.registration.registration_pair_metrics`
(SSIM / NCC / MI before and after, Dice and HD95 in mm on warped labels, the paper's threshold HD95,
Jacobian statistics, folding, SDlogJ in both conventions, end-point error when the truth is known);
rows go to ``pairs.csv``, mean and std to ``metrics.json``. "before" is the identity transform of the
pre-aligned pair, i.e. the affine-only baseline.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError
from threefold.datasets.splits import seed_everything
from threefold.medical.deformation import jacobian_determinant
from threefold.medical.registration.losses import registration_loss
from threefold.medical.registration.nestedmorph import NestedMorph, RegistrationOutput, check_registration_shape, count_parameters
from threefold.medical.registration.warp import warp
from threefold.pipelines.config import RunConfig, config_from_dict, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint
from threefold.pipelines.metrics.registration import registration_pair_metrics, spacing_from_affine, summarize_pairs
from threefold.pipelines.registry import Pipeline, register_pipeline

METHODS = ("nestedmorph", "voxelmorph", "classical")


@dataclass
class DataConfig:
    size: int = 64  # training grid, voxels per axis: 64 (paper), 96 or 128; a multiple of 32
    train_pairs: int = 64  # embedded sample only (without --data)
    val_pairs: int = 4
    test_pairs: int = 8
    max_displacement_vox: float = 4.0  # embedded sample: largest true displacement
    prealign: str = "affine"  # with --data: affine | rigid (Mattes MI, SimpleITK) | none
    cache: bool = True  # with --data: keep preprocessed pairs under <run>/hcp-cache (pre-alignment runs once)


@dataclass
class ModelConfig:
    diffeomorphic: bool = False
    integration_steps: int = 7
    heads: int = 2  # NestedMorph efficient-attention heads


@dataclass
class LossConfig:
    similarity: str = "lncc"  # lncc | mi
    window: int = 9
    smoothness_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    amsgrad: bool = True
    poly_power: float = 0.9  # lr · (1 − step / total)^power


@dataclass
class ClassicalConfig:
    method: str = "bspline"  # bspline (Mattes MI, cross-modal) | demons (same contrast only)
    iterations: int = 100  # optimiser iterations per level
    grid_spacing_vox: float = 8.0  # B-spline control-point spacing at the finest level
    bins: int = 32  # Mattes MI histogram bins


@dataclass
class RegistrationConfig(RunConfig):
    method: str = "nestedmorph"  # fixed by the pipeline name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)  # hcp-classical only


# ----------------------------------------------------------------------------------------------- data


def make_dataset(cfg: RegistrationConfig, split: str, data: Path | None, cache_dir: Path | None = None):
    """The pairs of one split: HCP subjects under ``data`` (pre-aligned by Mattes MI unless
    ``data.prealign=none``, cached in ``cache_dir``) or the embedded phantoms."""
    check_registration_shape((cfg.data.size,) * 3, "hcp pipelines (data.size)")
    if data is None:
        from threefold.datasets.registration_phantoms import RegistrationPhantoms

        n = {"train": cfg.data.train_pairs, "val": cfg.data.val_pairs, "test": cfg.data.test_pairs}[split]
        return RegistrationPhantoms(n, size=cfg.data.size, seed=cfg.seed, max_displacement_vox=cfg.data.max_displacement_vox, split=split, cache=True)
    from threefold.datasets.hcp import HCPRegistration

    if cfg.data.prealign not in ("affine", "rigid", "none"):
        raise ConfigError(f"data.prealign={cfg.data.prealign!r}; expected affine, rigid or none")
    prealign = None
    if cfg.data.prealign != "none":
        from threefold.medical.registration.affine import AffinePrealign

        prealign = AffinePrealign(cfg.data.prealign)
    return HCPRegistration(data, size=cfg.data.size, split=split, prealign=prealign,
                           cache_dir=cache_dir if cfg.data.cache else None)


def label_names(dataset: Any) -> dict[str, int] | None:
    """``{name: code}`` of the dataset's label maps, when its module declares ``LABELS``."""
    import sys

    return getattr(sys.modules[type(dataset).__module__], "LABELS", None)


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


class RegistrationDataModule(L.LightningDataModule):
    """Shuffled training pairs and the validation pairs, batched with their metadata."""

    def __init__(self, train: Any, val: Any, cfg: RegistrationConfig) -> None:
        super().__init__()
        self.train, self.val, self.t = train, val, cfg.trainer

    def _loader(self, dataset: Any, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.t.batch_size, shuffle=shuffle, num_workers=self.t.num_workers, collate_fn=_collate
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val, False)


# --------------------------------------------------------------------------------------------- model


class VoxelMorphBaseline(nn.Module):
    """MONAI ``VoxelMorph`` (default vxm UNet backbone) returning a :class:`RegistrationOutput`.

    The field comes from MONAI's network (integrated by its ``DVF2DDF`` when diffeomorphic); the
    image is warped with :func:`threefold.medical.registration.warp.warp` (border padding) so both
    methods are trained and scored through the same warp (MONAI's ``VoxelMorph`` pads with zeros).
    """

    def __init__(self, diffeomorphic: bool, integration_steps: int) -> None:
        super().__init__()
        from threefold.datasets.errors import require

        nets = require("monai.networks.nets", extra="medical")
        self.net = nets.VoxelMorph(integration_steps=integration_steps if diffeomorphic else 0)

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        _, ddf = self.net(moving, fixed)
        return RegistrationOutput(warp(moving, ddf), ddf, None)


def build_network(cfg: RegistrationConfig) -> nn.Module:
    m = cfg.model
    if cfg.method == "nestedmorph":
        return NestedMorph(heads=m.heads, diffeomorphic=m.diffeomorphic, integration_steps=m.integration_steps)
    if cfg.method == "voxelmorph":
        return VoxelMorphBaseline(m.diffeomorphic, m.integration_steps)
    raise ConfigError(f"method={cfg.method!r} has no network; expected nestedmorph or voxelmorph")


class RegistrationModule(L.LightningModule):
    """A registration network trained with :func:`registration_loss`; hyper-parameters are the config dict."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.cfg = config_from_dict(RegistrationConfig, hparams["config"])
        self.net = build_network(self.cfg)

    def forward(self, moving: Tensor, fixed: Tensor) -> RegistrationOutput:
        return self.net(moving, fixed)

    def _loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        out = self.net(batch["moving"], batch["fixed"])
        c = self.cfg.loss
        return registration_loss(out.warped, batch["fixed"], out.ddf, c.similarity, c.smoothness_weight, c.window)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self._loss(batch)
        n = batch["moving"].shape[0]
        self.log("train_loss", losses["loss"], batch_size=n, prog_bar=True)
        self.log("train_similarity", losses["similarity"], batch_size=n)
        self.log("train_smoothness", losses["smoothness"], batch_size=n)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self._loss(batch)
        n = batch["moving"].shape[0]
        self.log("val_loss", losses["loss"], batch_size=n, sync_dist=True)
        self.log("val_smoothness", losses["smoothness"], batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.Adam(self.parameters(), lr=o.lr, amsgrad=o.amsgrad)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # TransMorph / NestedMorph poly schedule, stepped per optimiser step over the whole run
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(1.0 - step / total, 0.0) ** o.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------- evaluation


def _batch(item: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v[None].to(device) if isinstance(v, Tensor) else v) for k, v in item.items()}


def evaluate_pairs(dataset: Any, register, example: Path | None = None) -> list[dict[str, Any]]:
    """Score every pair of ``dataset``; ``register(moving, fixed) -> ddf`` ``(1, 3, D, H, W)`` voxels.
    The first pair's volumes, field and Jacobian go to ``example`` (``.npz``) for the figures."""
    labels = label_names(dataset)
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        s = _batch(item, torch.device("cpu"))
        ddf = register(s["moving"], s["fixed"]).detach().float().cpu()
        if i == 0 and example is not None:
            np.savez_compressed(
                example, fixed=s["fixed"][0, 0].numpy(), moving=s["moving"][0, 0].numpy(),
                warped=warp(s["moving"], ddf)[0, 0].numpy(), ddf=ddf[0].numpy(),
                jacobian=jacobian_determinant(ddf[0]).numpy(), name=np.asarray(row_name(item, i)),
            )
        row: dict[str, Any] = {"pair": row_name(item, i)}
        row.update(
            registration_pair_metrics(
                s["moving"], s["fixed"], ddf, spacing_from_affine(item["affine"]),
                s.get("moving_label"), s.get("fixed_label"), labels, s.get("ddf_true"),
            )
        )
        rows.append(row)
    return rows


def row_name(item: dict[str, Any], index: int) -> str:
    return str(item.get("subject", index))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def network_register(module: RegistrationModule):
    """``register(moving, fixed) -> ddf`` running the network on its own device, in eval mode."""
    module.eval()
    device = next(module.parameters()).device

    @torch.no_grad()
    def register(moving: Tensor, fixed: Tensor) -> Tensor:
        return module(moving.to(device), fixed.to(device)).ddf

    return register


class _RegistrationPipeline(Pipeline):
    config_class = RegistrationConfig
    method: str

    def _config(self, cfg: RegistrationConfig) -> RegistrationConfig:
        if cfg.method != self.method:
            if cfg.method != "nestedmorph":  # the schema default: set by the pipeline, not the user
                raise ConfigError(f"{self.name} runs method={self.method}; use hcp-{cfg.method} for {cfg.method}")
            cfg.method = self.method
        check_registration_shape((cfg.data.size,) * 3, f"{self.name}: data.size")
        if cfg.loss.similarity not in ("lncc", "mi"):
            raise ConfigError(f"{self.name}: loss.similarity={cfg.loss.similarity!r}; expected lncc or mi")
        return cfg

    def _report(self, cfg: RegistrationConfig, ctx: RunContext, rows: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        _write_csv(ctx.run_dir / "pairs.csv", rows)
        metrics: dict[str, Any] = {
            "pipeline": self.name,
            "data": "synthetic registration phantoms (embedded sample)" if ctx.data is None else str(ctx.data),
            "size": cfg.data.size,
            "seed": cfg.seed,
            "test_pairs": len(rows),
        }
        metrics.update(extra)
        metrics.update(summarize_pairs(rows))
        return metrics

    def figures(self, cfg: RegistrationConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Loss curves, then the first test pair: slices, checkerboards, deformation grid and Jacobian."""
        from threefold.pipelines.figures import default_figures
        from threefold.pipelines.figures_registration import plot_registration

        paths = default_figures(run_dir, {})
        example = run_dir / "example_pair.npz"
        if example.is_file():
            ex = np.load(example)
            paths += plot_registration(run_dir, ex["fixed"], ex["moving"], ex["warped"], ex["ddf"], ex["jacobian"], name="pair0")
        return paths


class _LearnedRegistration(_RegistrationPipeline):
    def run(self, cfg: RegistrationConfig, ctx: RunContext) -> dict[str, Any]:
        cfg = self._config(cfg)
        seed_everything(cfg.seed)
        train, val, test = (make_dataset(cfg, s, ctx.data, ctx.run_dir / "hcp-cache") for s in ("train", "val", "test"))
        module = RegistrationModule({"config": config_to_dict(cfg)})
        trainer = ctx.fit(module, RegistrationDataModule(train, val, cfg))
        extra = {"method": self.method, "parameters": count_parameters(module.net), "global_step": int(trainer.global_step),
                 "diffeomorphic": cfg.model.diffeomorphic}
        if not trainer.is_global_zero:
            return extra
        ctx.export_weights(module.net)
        rows = evaluate_pairs(test, network_register(module), ctx.run_dir / "example_pair.npz")
        return self._report(cfg, ctx, rows, extra)


    def load(self, cfg: RegistrationConfig, checkpoint: Path) -> RegistrationModule:
        """The trained module of a Lightning checkpoint of this pipeline, in eval mode on the CPU:
        ``module(moving, fixed)`` → :class:`RegistrationOutput` for ``(B, 1, D, H, W)`` volumes in [0, 1]."""
        ckpt = load_checkpoint(checkpoint)
        stored = ckpt.get("hyper_parameters", {}).get("config")
        if not isinstance(stored, dict) or stored.get("method") != self.method:
            raise ConfigError(f"checkpoint {checkpoint} was not written by {self.name} (hyper_parameters.config.method "
                              f"is {stored.get('method') if isinstance(stored, dict) else None!r})")
        module = RegistrationModule(ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()


@register_pipeline
class HCPNestedMorph(_LearnedRegistration):
    name = "hcp-nestedmorph"
    description = "Deformable T1w -> b0 registration, NestedMorph (Marthi et al., WACV 2025)"
    method = "nestedmorph"


@register_pipeline
class HCPVoxelMorph(_LearnedRegistration):
    name = "hcp-voxelmorph"
    description = "Deformable T1w -> b0 registration baseline: MONAI VoxelMorph, same loss and metrics"
    method = "voxelmorph"


@register_pipeline
class HCPClassical(_RegistrationPipeline):
    name = "hcp-classical"
    description = "Deformable T1w -> b0 registration baseline: SimpleITK classical registration per pair (no training)"
    method = "classical"

    def run(self, cfg: RegistrationConfig, ctx: RunContext) -> dict[str, Any]:
        cfg = self._config(cfg)
        seed_everything(cfg.seed)
        from threefold.medical.registration.classical import register_classical

        test = make_dataset(cfg, "test", ctx.data, ctx.run_dir / "hcp-cache")

        def register(moving: Tensor, fixed: Tensor) -> Tensor:
            c = cfg.classical
            return register_classical(moving[0, 0], fixed[0, 0], c.method, iterations=c.iterations,
                                      grid_spacing_vox=c.grid_spacing_vox, bins=c.bins, seed=cfg.seed)[None]

        rows = evaluate_pairs(test, register, ctx.run_dir / "example_pair.npz")
        return self._report(cfg, ctx, rows, {"method": self.method})
