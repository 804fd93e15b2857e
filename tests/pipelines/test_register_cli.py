"""`threefold register` (issue 6, acceptance 4): NIfTI outputs with the fixed image's affine that load
back with nibabel, metrics.json, the checkpoint path, and clear errors for bad inputs. Input files are
written here with nibabel (not threefold's writer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.datasets.registration_phantoms import registration_phantom
from threefold.datasets.resample import resample_volume
from threefold.pipelines.cli import main
from threefold.pipelines.register import register_files

nib = pytest.importorskip("nibabel")
pytest.importorskip("SimpleITK")


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A T1-like moving phantom (1 mm, LAS-like) and a b0-like fixed one, rotated 3°, shifted 2 mm,
    on an oblique-free 1.5 × 1.5 × 2 mm grid: the situation of a real T1w / b0 pair."""
    from scipy.spatial.transform import Rotation

    root = tmp_path_factory.mktemp("register")
    ph = registration_phantom(5, size=48, max_displacement_vox=2.0)
    a_m = ph["affine"]
    centre = (a_m @ np.array([23.5, 23.5, 23.5, 1.0]))[:3]
    truth = np.eye(4)
    truth[:3, :3] = Rotation.from_euler("z", 3.0, degrees=True).as_matrix()
    truth[:3, 3] = centre - truth[:3, :3] @ centre + np.array([2.0, 0.0, -1.0])
    spacing = np.array([1.5, 1.5, 2.0])
    shape = (36, 34, 26)
    a_f = np.diag([*spacing, 1.0])
    a_f[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2.0
    fixed = resample_volume(ph["fixed"], a_m, shape, a_f, world_transform=truth).astype(np.float32)
    return {"moving": _save(root / "t1.nii.gz", ph["moving"], a_m), "fixed": _save(root / "b0.nii.gz", fixed, a_f),
            "fixed_affine": a_f, "shape": shape, "root": root}


def _check_outputs(out: Path, pair: dict) -> dict:
    for name, shape in (("warped", pair["shape"]), ("jacobian", pair["shape"]),
                        ("displacement", (*pair["shape"], 3)), ("displacement_vox", (*pair["shape"], 3))):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == shape, name
        np.testing.assert_allclose(img.affine, pair["fixed_affine"], atol=1e-5)  # the fixed image's affine
        assert np.isfinite(np.asarray(img.dataobj)).all()
    return json.loads((out / "metrics.json").read_text())


def test_register_classical_writes_fixed_geometry(pair, tmp_path):
    metrics = register_files(pair["moving"], pair["fixed"], tmp_path / "out", size=32, iterations=5,
                             affine_iterations=100)
    saved = _check_outputs(tmp_path / "out", pair)
    assert saved["method"] == "bspline" and saved["grid_size"] == [32, 32, 32]
    ncc = "NCC[global]"
    # T1 vs b0: anti-correlated; alignment makes the relation stronger (more negative)
    assert abs(saved[f"{ncc}/before"]) > abs(saved[f"{ncc}/initial"])
    mi = [k for k in saved if k.startswith("MI[")][0].split("/")[0]
    assert saved[f"{mi}/after"] > saved[f"{mi}/initial"]
    for key in ("folding%[J<=0]", "SDlogJ[positive]", "SDlogJ[learn2reg]", "SSIM3D[win=7,data_range=1]/after"):
        assert key in saved, key
    assert metrics["files"]["warped"].endswith("warped.nii.gz")
    # the world displacement carries the pre-alignment: about the 2 mm / 3° shift of the phantom
    disp = np.asarray(nib.load(tmp_path / "out" / "displacement.nii.gz").dataobj)
    assert 0.5 < np.linalg.norm(disp, axis=-1).mean() < 6.0
    jac = np.asarray(nib.load(tmp_path / "out" / "jacobian.nii.gz").dataobj)
    assert 0.5 < float(np.median(jac)) < 1.5


def test_cli_register_demons(pair, tmp_path, capsys):
    rc = main(["register", "--moving", str(pair["moving"]), "--fixed", str(pair["fixed"]), "--out",
               str(tmp_path / "o"), "--method", "demons", "--prealign", "none", "--size", "32"])
    assert rc == 0, capsys.readouterr().err
    saved = _check_outputs(tmp_path / "o", pair)
    assert saved["method"] == "demons" and saved["prealign"] == "none"
    assert "written to" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")
def test_register_with_a_checkpoint(pair, tmp_path):
    from threefold.pipelines.config import dump_config
    from threefold.pipelines.registration import RegistrationConfig, build_network

    cfg = RegistrationConfig(method="voxelmorph")
    cfg.data.size = 32
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_network(cfg).state_dict(), run / "model.pt")
    register_files(pair["moving"], pair["fixed"], tmp_path / "o", checkpoint=run / "model.pt", prealign="none",
                   device="cpu")
    saved = _check_outputs(tmp_path / "o", pair)
    assert saved["method"].startswith("checkpoint:") and saved["grid_size"] == [32, 32, 32]
    # a Lightning checkpoint: the config in its hyper-parameters, the weights under "net."
    from threefold.pipelines.config import config_to_dict

    state = {f"net.{k}": v for k, v in build_network(cfg).state_dict().items()}
    torch.save({"hyper_parameters": {"config": config_to_dict(cfg)}, "state_dict": state}, tmp_path / "last.ckpt")
    register_files(pair["moving"], pair["fixed"], tmp_path / "o3", checkpoint=tmp_path / "last.ckpt", prealign="none",
                   device="cpu")
    _check_outputs(tmp_path / "o3", pair)
    (run / "config.yaml").unlink()
    with pytest.raises(MissingFileError, match="config.yaml"):
        register_files(pair["moving"], pair["fixed"], tmp_path / "o2", checkpoint=run / "model.pt")
    torch.save({"state_dict": state}, tmp_path / "bare.ckpt")
    with pytest.raises(DataFormatError, match="without the registration config"):
        register_files(pair["moving"], pair["fixed"], tmp_path / "o2", checkpoint=tmp_path / "bare.ckpt")


def _cli_error(args, capsys) -> tuple[int, str]:
    rc = main(["register", *args])
    return rc, capsys.readouterr().err


def test_bad_inputs(pair, tmp_path, capsys):
    aff = np.eye(4)
    flat = _save(tmp_path / "slice.nii.gz", np.random.default_rng(0).random((64, 64)).astype(np.float32), aff)
    thin = _save(tmp_path / "thin.nii.gz", np.random.default_rng(0).random((64, 64, 1)).astype(np.float32), aff)
    dwi = _save(tmp_path / "dwi.nii.gz", np.random.default_rng(0).random((16, 16, 16, 5)).astype(np.float32), aff)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((16, 16, 16), np.float32), aff)
    out = ["--out", str(tmp_path / "o")]
    for bad, message in ((flat, "2-D image"), (thin, "2-D image"), (dwi, "mismatched dimensionality"),
                         (empty, "empty")):
        rc, err = _cli_error(["--moving", str(pair["moving"]), "--fixed", str(bad), *out], capsys)
        assert rc == 1 and message in err and str(bad) in err, err
    rc, err = _cli_error(["--moving", str(tmp_path / "nope.nii.gz"), "--fixed", str(pair["fixed"]), *out], capsys)
    assert rc == 1 and "not found" in err
    rc, err = _cli_error(["--moving", str(pair["moving"]), "--fixed", str(pair["fixed"]), "--checkpoint", "x.pt",
                          "--method", "demons", *out], capsys)
    assert rc == 2 and "exclusive" in err
    with pytest.raises(DataFormatError, match="mask is empty"):
        empty_mask = _save(tmp_path / "mask.nii.gz", np.zeros((36, 34, 26), np.uint8), pair["fixed_affine"])
        register_files(pair["moving"], pair["fixed"], tmp_path / "o", fixed_mask=empty_mask)
    assert not (tmp_path / "o" / "warped.nii.gz").exists()  # nothing written on failure
