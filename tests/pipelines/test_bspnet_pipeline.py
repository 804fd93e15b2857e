"""shapenet-bspnet end to end: a tiny run on the embedded sample, a hand-set checkpoint whose meshes are
known exactly (a box), `threefold predict` on a user's mesh, and OBJ/PLY export read back by trimesh."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.pipelines.bspnet import BSPNetModule, ShapeNetBSPNetConfig
from threefold.pipelines.config import config_to_dict
from threefold.pipelines.cli import main

TINY = [
    "model.ef_dim=2", "model.p_dim=16", "model.c_dim=4",
    "train.steps_16=2", "train.steps_32=2", "train.steps_64=2", "train.steps_final=2", "train.points_per_step=128",
    "trainer.batch_size=2", "embedded.shapes_per_category=1", "eval.n_sample=1024", "eval.n_keep=256",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]


def test_tiny_run_on_embedded_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "shapenet-bspnet", *TINY]) == 0
    (run,) = (tmp_path / "runs" / "shapenet-bspnet").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 8 and metrics["num_shapes"] == 4
    assert [r["shape"] for r in metrics["per_shape"]] == ["chair_000", "table_000", "lamp_000", "plane_000"]
    assert metrics["hull_cd_x1000"] > 0
    stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["hyper_parameters"]["config"]["train"]["schedule"] == "0,1"
    csv = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert "phase" in csv[0]


BOX = ([-0.3, -0.2, -0.1], [0.3, 0.2, 0.25])


def box_checkpoint(path: Path) -> Path:
    """A module whose decoder ignores its input and outputs the 6 planes of BOX (plus unused planes)."""
    cfg = config_to_dict(ShapeNetBSPNetConfig())
    cfg["model"] = {"ef_dim": 2, "p_dim": 8, "c_dim": 3}
    cfg["eval"].update(n_sample=2048, n_keep=512)
    module = BSPNetModule({"config": cfg})
    lo, hi = np.array(BOX[0]), np.array(BOX[1])
    planes = np.zeros((4, 8))
    planes[:3, :3], planes[3, :3] = np.eye(3), -hi
    planes[:3, 3:6], planes[3, 3:6] = -np.eye(3), lo
    planes[:, 6:] = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]  # z <= -5: outside the cube
    with torch.no_grad():
        module.model.decoder.out.weight.zero_()
        module.model.decoder.out.bias.copy_(torch.tensor(planes, dtype=torch.float32).reshape(-1))
        module.model.T.zero_()
        module.model.T[:6, 0] = 1.0  # convex 0: the box
        module.model.T[6:, 1] = 1.0  # convex 1: empty inside the cube
        # convex 2 has no plane: skipped
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_predict_user_mesh_gives_the_exact_box(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    ckpt = box_checkpoint(tmp_path / "box.ckpt")
    user = trimesh.creation.icosphere(subdivisions=1, radius=0.4)
    user.export(tmp_path / "user.obj")
    for suffix in ("obj", "ply"):
        out = tmp_path / f"pred.{suffix}"
        assert main(["predict", "shapenet-bspnet", "--checkpoint", str(ckpt), "--input", str(tmp_path / "user.obj"),
                     "--out", str(out)]) == 0
        mesh = trimesh.load(out, force="mesh", process=True)
        assert len(mesh.vertices) == 8 and len(mesh.faces) == 12 and mesh.is_watertight
        assert mesh.volume == pytest.approx(0.6 * 0.4 * 0.35, rel=1e-5)
        np.testing.assert_allclose(mesh.bounds, np.array(BOX), atol=1e-6)
    counts = json.loads((tmp_path / "pred.json").read_text())
    assert counts["num_convexes"] == 1 and counts["num_faces"] == 6


def test_export_parts_are_closed(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from threefold.geometry.bspnet.export import export_bsp_mesh
    from threefold.geometry.bspnet.extraction import parts_from_halfspaces

    def box(lo, hi):
        return np.concatenate([np.c_[np.eye(3), -np.asarray(hi)], np.c_[-np.eye(3), np.asarray(lo)]])

    mesh = parts_from_halfspaces([box([-0.4, -0.1, -0.1], [0.0, 0.1, 0.1]), box([-0.1, -0.3, -0.1], [0.1, 0.3, 0.1])])
    paths = export_bsp_mesh(mesh, tmp_path / "two.ply", parts=True)
    assert [p.name for p in paths] == ["two.ply", "convex_000.ply", "convex_001.ply"]
    for p, vol in zip(paths[1:], (0.4 * 0.2 * 0.2, 0.2 * 0.6 * 0.2)):
        part = trimesh.load(p, force="mesh", process=True)
        assert part.is_watertight and part.volume == pytest.approx(vol, rel=1e-6)
    union = trimesh.load(paths[0], force="mesh", process=False)
    assert len(union.vertices) == 16


def test_eval_scores_box_against_its_own_surface(tmp_path, monkeypatch):
    """A model that always outputs BOX, evaluated on an IM-NET file of BOX itself: CD ~ 0, NC ~ 1."""
    from threefold.datasets.imnet_hdf5 import write_imnet_hdf5
    from threefold.datasets.mesh_prepare import prepare_mesh
    from threefold.geometry.bspnet.evaluation import surface_points
    from threefold.geometry.bspnet.extraction import parts_from_halfspaces
    from threefold.pipelines.bspnet import _module_from_checkpoint, evaluate_shapes

    lo, hi = np.array(BOX[0]), np.array(BOX[1])
    v = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    rec = prepare_mesh(v, f, normalize=False)
    write_imnet_hdf5(tmp_path / "box_test.hdf5", {k: a[None] for k, a in rec.items()}, names=["box"])
    gt = parts_from_halfspaces([np.concatenate([np.c_[np.eye(3), -hi], np.c_[-np.eye(3), lo]])], bound=None)
    p, n = surface_points(gt, 4096, 4096, seed=5)
    np.savez(tmp_path / "box_test_surface.npz", points=p[None], normals=n[None])
    module = _module_from_checkpoint(box_checkpoint(tmp_path / "box.ckpt"))
    ev = dict(module.hparams["config"]["eval"])
    res = evaluate_shapes(module, tmp_path / "box_test.hdf5", tmp_path / "meshes", ev, seed=0)
    row = res["per_shape"][0]
    assert row["num_convexes"] == 1 and row["num_vertices"] == 8 and row["num_faces"] == 6
    # 512 protocol points on a 1.18-area surface: the sampling floor of CD x1000 is about 0.5
    # (and nearest neighbours across the box edges have perpendicular normals: NC below 1)
    assert row["cd_x1000"] < 1.0 and row["nc"] > 0.9
    # the hull of a convex shape is the shape: same CD scale
    assert row["hull_cd_x1000"] < 1.0
    assert (tmp_path / "meshes" / "box_bsp.obj").is_file()
