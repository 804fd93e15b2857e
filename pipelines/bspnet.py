"""``shapenet-bspnet``: BSP-Net auto-encoding of voxel shapes into compact polygonal meshes.

Chen, Tagliasacchi and Zhang, "BSP-Net: Generating Compact Meshes via Binary Space Partitioning",
CVPR 2020. Recipe (the paper's, in ``configs/shapenet-bspnet.yaml``): 64^3 voxel encoder, p = 4096
planes, c = 256 convexes, Adam lr 1e-4 beta1 0.5, 24 shapes x 4096 points per step, phase 0 trained
progressively on the 16^3, 32^3 and 64^3 point samples, then the final phase (1, 2, 3 or 4, the
``schedule``) at 64^3. After training every shape is meshed exactly (half-space intersection, see
:mod:`threefold.geometry.bspnet.extraction`) and scored with the paper's protocol
(:mod:`threefold.geometry.bspnet.evaluation`): CD x1000, NC, ECD x1000, #convexes, #V, #F, next to
the convex hull of the ground truth as a baseline.

Data: ``--data`` is an IM-NET HDF5 file or a folder with ``*_train.hdf5`` (and optionally
``*_test.hdf5``, evaluated instead of the training file when present). Ground-truth surface points
come from ``<stem>_surface.npz`` (``points``/``normals`` (N, 4096, 3)) next to the file when present,
else from marching cubes of the 64^3 voxels (the paper's numbers use points sampled on the original
meshes, which the HDF5 does not hold). Without ``--data`` the embedded procedural sample (chairs,
tables, lamps, planes as unions of convex primitives) is generated under ``run_dir/data``; its
ground truth is sampled exactly on the union of primitives, and the shapes are auto-encoded.

Differences from the reference training script, and why: one Adam optimiser runs through all stages
(the reference restarts the process, hence the optimiser, per stage); the random subset of points
used per step is drawn from a generator seeded by ``seed`` and the step (resumable, reproducible).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.imnet_hdf5 import IMNetShapes, points_to_coords, read_imnet_hdf5, write_imnet_hdf5
from threefold.datasets.paths import safe_output_path
from threefold.datasets.splits import seed_everything
from threefold.geometry.bspnet.evaluation import bspnet_metrics, convex_hull_mesh, sample_triangles, surface_points
from threefold.geometry.bspnet.export import export_bsp_mesh
from threefold.geometry.bspnet.extraction import BSPMesh, extract_bsp_mesh, marching_cubes_mesh, parts_from_halfspaces
from threefold.geometry.bspnet.losses import bspnet_loss
from threefold.geometry.bspnet.model import BSPNet
from threefold.pipelines.config import RunConfig, config_from_dict, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint, write_metrics
from threefold.pipelines.loaders import RankShardSampler
from threefold.pipelines.metrics import PointSetMetrics
from threefold.pipelines.registry import Pipeline, register_pipeline

SCHEDULES = ("0,1", "0,2", "0,3", "0,4")


@dataclass
class BSPModelConfig:
    ef_dim: int = 32
    p_dim: int = 4096
    c_dim: int = 256


@dataclass
class BSPTrainConfig:
    schedule: str = "0,1"  # phase 0 (progressive 16 -> 32 -> 64), then the final phase at 64
    steps_16: int = 1000
    steps_32: int = 1000
    steps_64: int = 1000
    steps_final: int = 1000
    points_per_step: int = 4096  # points per shape per step (the reference's point_batch_size)
    lr: float = 1e-4
    beta1: float = 0.5


@dataclass
class BSPEvalConfig:
    grid: int = 64  # a convex is kept when it contains a cell centre of this grid
    remove_redundant: bool = False
    n_sample: int = 16384
    n_keep: int = 4096
    max_shapes: int = 0  # 0: every shape of the evaluated file
    export_parts: bool = False  # also one closed file per convex
    mesh_format: str = "obj"  # obj | ply


@dataclass
class EmbeddedSampleConfig:
    shapes_per_category: int = 4
    seed: int = 0


@dataclass
class ShapeNetBSPNetConfig(RunConfig):
    model: BSPModelConfig = field(default_factory=BSPModelConfig)
    train: BSPTrainConfig = field(default_factory=BSPTrainConfig)
    eval: BSPEvalConfig = field(default_factory=BSPEvalConfig)
    embedded: EmbeddedSampleConfig = field(default_factory=EmbeddedSampleConfig)


def stages(train: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``(phase, resolution, steps)`` of each stage of the schedule."""
    if train["schedule"] not in SCHEDULES:
        raise ConfigError(f"train.schedule={train['schedule']!r}; expected one of {SCHEDULES}")
    final = int(train["schedule"].split(",")[1])
    return [(0, 16, train["steps_16"]), (0, 32, train["steps_32"]), (0, 64, train["steps_64"]), (final, 64, train["steps_final"])]


class ShapeRecords(torch.utils.data.Dataset):
    """Voxels and the three point samples of each shape (raw uint8, converted on the device)."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["voxels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"voxels": torch.from_numpy(np.ascontiguousarray(self.data["voxels"][i, ..., 0]))[None]}
        for r in (16, 32, 64):
            item[f"points_{r}"] = torch.from_numpy(self.data[f"points_{r}"][i])
            item[f"values_{r}"] = torch.from_numpy(self.data[f"values_{r}"][i])
        return item


class BSPDataModule(L.LightningDataModule):
    """Draws ``batch_size`` shapes with replacement per step from a seeded generator; one epoch is the
    whole run (``total_steps`` batches) so that per-epoch hooks do not fire every few steps."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, total_steps: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.dataset = ShapeRecords(data)
        self.batch_size, self.total_steps, self.seed, self.num_workers = batch_size, total_steps, seed, num_workers

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # Under DDP (W processes) the ranks split one seeded stream of W x total_steps x batch_size
        # draws instead of each drawing the same shapes: W = 1 is the single-process stream.
        trainer = getattr(self, "trainer", None)
        world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
        stream = torch.utils.data.RandomSampler(
            self.dataset, replacement=True, num_samples=world * self.total_steps * self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )
        sampler = RankShardSampler(stream, world, rank)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)


class BSPNetModule(L.LightningModule):
    """BSPNet + the per-phase loss, stage chosen from ``global_step``; hyper-parameters as a plain dict."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        m = hparams["config"]["model"]
        self.model = BSPNet(m["ef_dim"], m["p_dim"], m["c_dim"], phase=0)
        self.stages = stages(hparams["config"]["train"])
        self.model.phase = self.stages[-1][0]  # a loaded checkpoint is in its final phase

    def stage_at(self, step: int) -> tuple[int, int]:
        end = 0
        for phase, res, steps in self.stages:
            end += steps
            if step < end:
                return phase, res
        return self.stages[-1][0], self.stages[-1][1]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        phase, res = self.stage_at(self.global_step)
        self.model.phase = phase
        pts, vals = batch[f"points_{res}"], batch[f"values_{res}"]
        n = min(self.hparams["config"]["train"]["points_per_step"], pts.shape[1])
        gen = torch.Generator().manual_seed(self.hparams["config"]["seed"] * 1_000_003 + self.global_step)
        pick = torch.randperm(pts.shape[1], generator=gen)[:n].to(pts.device)
        coords = (pts[:, pick].float() + 0.5) / 256 - 0.5
        out = self.model(batch["voxels"].float(), coords)
        loss = bspnet_loss(out["h2"], out["h3"], vals[:, pick].float(), self.model.T, self.model.W, phase)
        bs = pts.shape[0]
        self.log("train_loss", loss.total, batch_size=bs, prog_bar=True)
        self.log("train_recon", loss.recon, batch_size=bs)
        self.log("phase", float(phase), batch_size=bs)
        self.log("resolution", float(res), batch_size=bs)
        return loss.total

    def configure_optimizers(self):
        t = self.hparams["config"]["train"]
        return torch.optim.Adam(self.model.parameters(), lr=t["lr"], betas=(t["beta1"], 0.999))


def _module_from_checkpoint(checkpoint: Path) -> BSPNetModule:
    ckpt = load_checkpoint(checkpoint)
    if "hyper_parameters" not in ckpt or "config" not in ckpt["hyper_parameters"]:
        raise ConfigError(f"checkpoint {checkpoint} was not written by shapenet-bspnet (no hyper_parameters.config)")
    module = BSPNetModule(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def embedded_sample(folder: Path, shapes_per_category: int, seed: int) -> Path:
    """Write (once) the procedural sample: ``procedural_train.hdf5`` (+ names) and its exact ground-truth
    surface points ``procedural_train_surface.npz``. Returns the HDF5 path."""
    from threefold.datasets.procedural_shapes import procedural_dataset, procedural_records

    path = folder / "procedural_train.hdf5"
    surface = folder / "procedural_train_surface.npz"
    if path.is_file() and surface.is_file():
        return path
    shapes = procedural_dataset(shapes_per_category, seed)
    write_imnet_hdf5(path, procedural_records(shapes, seed, progress=True), names=[s.name for s in shapes])
    pts, nrm = [], []
    for k, s in enumerate(shapes):
        gt = parts_from_halfspaces([p.halfspaces for p in s.parts], bound=None)
        p, n = surface_points(gt, seed=seed + k)
        pts.append(p)
        nrm.append(n)
    np.savez_compressed(surface, points=np.stack(pts).astype(np.float32), normals=np.stack(nrm).astype(np.float32))
    return path


def ground_truth_surface(path: Path, voxels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 4096, 3) points and normals from ``<stem>_surface.npz``, else from the voxels' marching cubes."""
    npz = path.with_name(f"{path.stem}_surface.npz")
    if npz.is_file():
        with np.load(npz) as f:
            pts, nrm = f["points"], f["normals"]
        if pts.shape[0] != len(voxels) or pts.shape != nrm.shape or pts.shape[-1] != 3:
            raise DataFormatError(f"{npz}: points {pts.shape} / normals {nrm.shape}; expected ({len(voxels)}, n, 3) each")
        return pts, nrm, f"surface points from {npz.name}"
    pts, nrm = [], []
    for k, vox in enumerate(voxels):
        v, f = marching_cubes_mesh(vox[..., 0] if vox.ndim == 4 else vox)
        p, n = sample_triangles(v, f[:, ::-1], 4096, seed + k)  # skimage faces wind inward for a solid
        pts.append(p)
        nrm.append(n)
    return np.stack(pts), np.stack(nrm), "marching cubes of the 64^3 voxels"


def _mean_of_finite(values: list[float]) -> float:
    """Mean over the shapes that have a value (ECD is undefined for a shape without edge points)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@torch.no_grad()
def mesh_shapes(module: BSPNetModule, voxels: np.ndarray, ev: dict[str, Any], batch: int = 8) -> list[BSPMesh]:
    """Exact BSP meshes of (N, 64, 64, 64[, 1]) voxel shapes with the final-phase model."""
    module.eval()
    dev = module.device
    meshes = []
    for s in range(0, len(voxels), batch):
        v = torch.as_tensor(np.asarray(voxels[s : s + batch]), dtype=torch.float32, device=dev)
        v = v[..., 0] if v.dim() == 5 else v
        planes = module.model.planes(v[:, None])
        for k in range(len(planes)):
            meshes.append(extract_bsp_mesh(planes[k], module.model.T, ev["grid"], ev["remove_redundant"]))
    return meshes


def evaluate_shapes(module: BSPNetModule, data_path: Path, out_dir: Path, ev: dict[str, Any], seed: int) -> dict[str, Any]:
    """Mesh every shape of ``data_path``, write the meshes and score them with the paper's protocol."""
    data = read_imnet_hdf5(data_path, ())
    txt = data_path.with_suffix(".txt")
    shape_names = txt.read_text().split() if txt.is_file() else [str(i) for i in range(len(data["voxels"]))]
    n = len(data["voxels"]) if ev["max_shapes"] <= 0 else min(ev["max_shapes"], len(data["voxels"]))
    voxels = data["voxels"][:n]
    gt_pts, gt_nrm, gt_source = ground_truth_surface(data_path, voxels, seed)
    meshes = mesh_shapes(module, voxels, ev)
    # scored in one process (rank 0 after a DDP fit) over every shape: no cross-rank sync at compute()
    acc, hull_acc = PointSetMetrics(sync_on_compute=False), PointSetMetrics(sync_on_compute=False)
    rows = []
    for k, mesh in enumerate(meshes):
        name = shape_names[k]
        row: dict[str, Any] = {"shape": name, **mesh.counts()}
        hull = convex_hull_mesh(gt_pts[k])
        hp, hn = surface_points(hull, ev["n_sample"], ev["n_keep"], seed=seed + k)
        row["hull_cd_x1000"] = bspnet_metrics(hp, hn, gt_pts[k], gt_nrm[k], seed)["cd_x1000"]
        hull_acc.update(*(torch.as_tensor(a, dtype=torch.float64)[None] for a in (hp, gt_pts[k], hn, gt_nrm[k])))
        if mesh.num_convexes == 0:
            row.update(cd_x1000=float("nan"), nc=float("nan"), ecd_x1000=float("nan"), mesh=None)
            rows.append(row)
            continue
        pp, pn = surface_points(mesh, ev["n_sample"], ev["n_keep"], seed=seed + k)
        row.update(bspnet_metrics(pp, pn, gt_pts[k], gt_nrm[k], seed))
        acc.update(*(torch.as_tensor(a, dtype=torch.float64)[None] for a in (pp, gt_pts[k], pn, gt_nrm[k])))
        # shape names come from the data's name list: confined to out_dir
        target = safe_output_path(out_dir, f"{name}_bsp.{ev['mesh_format']}")
        path = export_bsp_mesh(mesh, target, parts=ev["export_parts"])[0]
        row["mesh"] = str(path.relative_to(out_dir.resolve().parent))
        row["hull_over_bsp_cd"] = row["hull_cd_x1000"] / row["cd_x1000"] if row["cd_x1000"] > 0 else float("inf")
        rows.append(row)
    meshed = [r for r in rows if r["mesh"] is not None]
    summary = {k: float(v) for k, v in acc.compute().items()} if meshed else {}
    key = "CD[squared=True,reduction=sum]"
    return {
        "num_shapes": n,
        "num_meshed": len(meshed),
        "ground_truth": gt_source,
        "cd_x1000": summary.get(key, float("nan")) * 1000,
        "nc": summary.get("NC", float("nan")),
        "ecd_x1000": _mean_of_finite([r["ecd_x1000"] for r in meshed]),
        "hull_cd_x1000": float(hull_acc.compute()[key]) * 1000,
        "mean_convexes": float(np.mean([r["num_convexes"] for r in rows])),
        "mean_vertices": float(np.mean([r["num_vertices"] for r in rows])),
        "mean_faces": float(np.mean([r["num_faces"] for r in rows])),
        "per_shape": rows,
    }


class BSPNetPredictor:
    """``predict(voxels (64, 64, 64)) -> BSPMesh`` and ``predict_file(path) -> BSPMesh``."""

    def __init__(self, module: BSPNetModule) -> None:
        self.module = module.eval()

    def predict(self, voxels: np.ndarray) -> BSPMesh:
        voxels = np.asarray(voxels)
        if voxels.shape[:3] != (64, 64, 64):
            raise DataFormatError(f"BSP-Net input voxels have shape {voxels.shape}; expected (64, 64, 64)")
        return mesh_shapes(self.module, voxels[None], self.module.hparams["config"]["eval"])[0]

    def predict_file(self, path: Path) -> BSPMesh:
        return self.predict(voxels_from_file(path))


def read_obj_polygons(path: Path) -> tuple[np.ndarray, list[list[int]]]:
    """Vertices and 0-based polygons of an OBJ written by :func:`export_bsp_mesh`."""
    verts, polys = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("v "):
            verts.append([float(t) for t in line.split()[1:4]])
        elif line.startswith("f "):
            polys.append([int(t.split("/")[0]) - 1 for t in line.split()[1:]])
    return np.asarray(verts), polys


def voxels_from_file(path: Path) -> np.ndarray:
    """64^3 occupancy of a user's input: a mesh (.obj/.off/.ply/.stl, voxelised like the training data),
    an IM-NET .hdf5 (its first shape) or a .npy array (64, 64, 64)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".hdf5", ".h5"):
        return read_imnet_hdf5(path, ())["voxels"][0, ..., 0]
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.shape != (64, 64, 64):
            raise DataFormatError(f"{path}: voxel array shape {arr.shape}; expected (64, 64, 64)")
        return arr
    from threefold.datasets.mesh_prepare import load_mesh, prepare_mesh

    verts, tris = load_mesh(path)
    return prepare_mesh(verts, tris, name=str(path))["voxels"][..., 0]


def _resolve_data(ctx: RunContext, cfg: ShapeNetBSPNetConfig) -> tuple[Path, Path]:
    if ctx.data is None:
        train = embedded_sample(ctx.run_dir / "data", cfg.embedded.shapes_per_category, cfg.embedded.seed)
        return train, train
    train = IMNetShapes.resolve(ctx.data, "train")
    try:
        test = IMNetShapes.resolve(ctx.data, "test") if ctx.data.is_dir() else train
    except FileNotFoundError:
        test = train
    return train, test


@register_pipeline
class ShapeNetBSPNet(Pipeline):
    name = "shapenet-bspnet"
    description = "BSP-Net (Chen et al. 2020): voxels -> compact polygonal meshes by binary space partitioning"
    config_class = ShapeNetBSPNetConfig

    def run(self, cfg: ShapeNetBSPNetConfig, ctx: RunContext) -> dict[str, Any]:
        seed_everything(cfg.seed)
        train_path, test_path = _resolve_data(ctx, cfg)
        hp = {"config": config_to_dict(cfg)}
        module = BSPNetModule(hp)
        total = sum(s for _, _, s in module.stages)
        dm = BSPDataModule(read_imnet_hdf5(train_path), cfg.trainer.batch_size, total, cfg.seed, cfg.trainer.num_workers)
        # Which parameters take part in the loss depends on the phase (W only in phase 0; T enters phases
        # 1-2 through a non-differentiable threshold): DDP must look for unused ones at each step.
        unused = {"strategy": "ddp_find_unused_parameters_true"} if cfg.trainer.strategy == "ddp" else {}
        trainer = ctx.fit(module, dm, max_steps=total, max_epochs=-1, use_distributed_sampler=False, **unused)
        result: dict[str, Any] = {
            "pipeline": self.name,
            "data": "embedded procedural sample" if ctx.data is None else str(ctx.data),
            "train_file": str(train_path),
            "eval_file": str(test_path),
            "global_step": int(trainer.global_step),
            "final_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "seed": cfg.seed,
        }
        if trainer.is_global_zero:
            ctx.export_weights(module.model)
            module.model.phase = module.stages[-1][0]
            result.update(evaluate_shapes(module, test_path, ctx.run_dir / "meshes", config_to_dict(cfg)["eval"], cfg.seed))
            write_metrics(ctx.run_dir / "per_shape.json", {"per_shape": result["per_shape"]})
        return result

    def evaluate(self, cfg: ShapeNetBSPNetConfig, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        module = _module_from_checkpoint(checkpoint)
        stored = config_from_dict(ShapeNetBSPNetConfig, module.hparams["config"])
        _, test_path = _resolve_data(ctx, stored)
        return {"pipeline": self.name, "checkpoint": str(checkpoint),
                **evaluate_shapes(module, test_path, ctx.run_dir / "meshes", config_to_dict(cfg)["eval"], cfg.seed)}

    def figures(self, cfg: ShapeNetBSPNetConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Training curves, then for each meshed shape (at most 8) its input voxels beside the exported
        BSP mesh with each convex in its own colour, counts and CD in the caption."""
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_meshes import plot_voxels_and_convexes

        paths = super().figures(cfg, run_dir, metrics)
        eval_file = Path(metrics.get("eval_file", ""))
        if not eval_file.is_file():
            return paths
        voxels = read_imnet_hdf5(eval_file, ())["voxels"]
        out = figures_dir(run_dir)
        rows = [(k, r) for k, r in enumerate(metrics.get("per_shape", [])) if r.get("mesh")][:8]
        for k, row in rows:
            verts, polys = read_obj_polygons(run_dir / row["mesh"])
            caption = (f"BSP-Net on {row['shape']}: input voxels and the output mesh, each of its {row['num_convexes']} "
                       f"convexes in its own colour; {row['num_vertices']} vertices, {row['num_faces']} faces; "
                       f"CD x1000 {row['cd_x1000']:.3f} (convex hull {row['hull_cd_x1000']:.3f}), NC {row['nc']:.3f}")
            paths.append(plot_voxels_and_convexes(out / f"mesh_{row['shape']}.png", voxels[k], verts, polys,
                                                  row["shape"], caption))
        return paths

    def load(self, cfg: ShapeNetBSPNetConfig, checkpoint: Path) -> BSPNetPredictor:
        return BSPNetPredictor(_module_from_checkpoint(checkpoint))

    def predict(self, cfg: ShapeNetBSPNetConfig, checkpoint: Path, input: Path, out: Path) -> None:
        mesh = self.load(cfg, checkpoint).predict_file(input)
        export_bsp_mesh(mesh, out, parts=cfg.eval.export_parts)
        out.with_suffix(".json").write_text(json.dumps({"input": str(input), **mesh.counts()}, indent=1))
