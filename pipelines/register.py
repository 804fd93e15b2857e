"""``threefold register``: register any two NIfTI brain volumes and write the result in the fixed
image's geometry.

    threefold register --moving t1.nii.gz --fixed b0.nii.gz --out DIR [--method bspline|demons]
                       [--checkpoint RUN/model.safetensors|last.ckpt] [--size 64] [--prealign rigid|affine|none]
                       [--moving-mask M] [--fixed-mask F] [--iterations N]

Steps (issue 6, §1 and §4):

1. read both volumes, reoriented to the closest RAS+ axes (the training convention);
2. affine pre-alignment by Mattes mutual information
   (:class:`threefold.medical.registration.affine.AffinePrealign`, rigid by default);
3. resampling onto the isotropic training grid of ``--size`` voxels per axis covering the fixed
   image (or its mask), per-volume min–max to [0, 1]
   (:func:`threefold.datasets.registration_transforms.default_pair_transform`);
4. the deformable step on that grid: the SimpleITK baseline
   (:func:`threefold.medical.registration.classical.register_classical`, B-spline Mattes MI by
   default) or, with ``--checkpoint``, a NestedMorph / VoxelMorph network trained by
   ``threefold run hcp-nestedmorph`` / ``hcp-voxelmorph``;
5. results mapped back onto the fixed image's original grid
   (:mod:`threefold.medical.registration.outputs`): ``warped.nii.gz``, ``displacement.nii.gz``
   (mm, world RAS+), ``displacement_vox.nii.gz`` (fixed voxels), ``jacobian.nii.gz``, all with the
   fixed file's affine, and ``metrics.json``.

``metrics.json`` holds SSIM (3-D, data range 1), global NCC and MI (32 bins, nats) on the training
grid for three stages — ``initial`` (no transform), ``before`` (affine only) and ``after`` (affine +
deformable) — and the deformable field's Jacobian statistics, folding percentage and SDlogJ in both
named conventions (:mod:`threefold.pipelines.metrics.registration`).

A checkpoint is either the weights exported at the end of a run (``model.safetensors`` or
``model.pt``, a plain state dict) with the run's ``config.yaml`` beside it, or a Lightning
``.ckpt`` (its hyper-parameters hold the config); both are loaded without executing code
(``weights_only``). The network runs on the grid size of its config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, require
from threefold.datasets.registration_transforms import PairCompose, default_pair_transform
from threefold.datasets.volumes import read_nifti

PREALIGN = ("rigid", "affine", "none")
METHODS = ("bspline", "demons")
MIN_SPATIAL = 8  # voxels per axis below which a volume is treated as a 2-D image


def _read_volume(path: Path, role: str) -> dict[str, Any]:
    """Read a 3-D NIfTI (closest RAS+) with the checks of the command line."""
    if not path.exists():
        raise MissingFileError(f"--{role} {path}: file not found")
    nib = require("nibabel", extra="medical")
    try:
        header_shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types for a non-NIfTI file
        raise DataFormatError(f"--{role} {path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    spatial = header_shape[:3]
    if len(header_shape) < 3 or min(spatial) < MIN_SPATIAL:
        raise DataFormatError(f"--{role} {path}: a 2-D image (shape {header_shape}); registration needs 3-D volumes "
                              f"with at least {MIN_SPATIAL} voxels along each axis")
    vol = read_nifti(path, canonical=True)
    image = vol["image"]
    if not bool(torch.isfinite(image).all()) or float(image.max() - image.min()) == 0.0:
        raise DataFormatError(f"--{role} {path}: the volume is empty (every voxel equals {float(image.flatten()[0])})")
    vol["path"], vol["header_shape"] = path, header_shape
    return vol


def _check_dimensionality(moving: dict[str, Any], fixed: dict[str, Any]) -> None:
    m, f = moving["image"].shape[0], fixed["image"].shape[0]
    if m == 1 and f == 1:
        return
    describe = lambda c, shape: "3-D" if c == 1 else f"4-D with {c} volumes {shape}"  # noqa: E731
    raise DataFormatError(
        f"mismatched dimensionality: --moving {moving['path']} is {describe(m, moving['header_shape'])}, --fixed "
        f"{fixed['path']} is {describe(f, fixed['header_shape'])}; register one 3-D volume to another "
        "(for a DWI series pass the mean b0, e.g. from threefold.datasets.hcp.read_mean_b0)")


def _read_mask(path: Path | None, ref: dict[str, Any], role: str) -> Tensor | None:
    if path is None:
        return None
    if not path.exists():
        raise MissingFileError(f"--{role} {path}: file not found")
    mask = read_nifti(path, canonical=True, dtype=torch.int64)
    if mask["image"].shape != ref["image"].shape or not torch.allclose(mask["affine"], ref["affine"], atol=1e-3):
        raise DataFormatError(f"--{role} {path}: shape {tuple(mask['image'].shape[1:])} / affine differ from its image "
                              f"{ref['path']} (expected the same voxel grid)")
    if not bool((mask["image"] != 0).any()):
        raise DataFormatError(f"--{role} {path}: the mask is empty")
    return mask["image"] != 0


def load_network(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """A registration network and its grid size from an ``hcp-nestedmorph`` / ``hcp-voxelmorph`` run.

    Accepts the exported weights (``model.safetensors`` / ``model.pt``) with ``config.yaml`` in the
    same folder, or a Lightning ``.ckpt``. Returns the network in eval mode on ``device``.
    """
    from threefold.pipelines.config import config_from_dict, read_yaml
    from threefold.pipelines.engine import load_checkpoint
    from threefold.pipelines.registration import RegistrationConfig, build_network

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingFileError(f"--checkpoint {checkpoint}: file not found")
    if checkpoint.suffix == ".ckpt":
        ckpt = load_checkpoint(checkpoint)
        hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
        if "config" not in hparams or "state_dict" not in ckpt:
            raise DataFormatError(f"--checkpoint {checkpoint}: a Lightning checkpoint without the registration "
                                  "config in its hyper-parameters (expected one written by hcp-nestedmorph / hcp-voxelmorph)")
        values = hparams["config"]
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    else:
        config = checkpoint.parent / "config.yaml"
        if not config.is_file():
            raise MissingFileError(f"--checkpoint {checkpoint}: no config.yaml beside the weights (expected the run "
                                   "folder of hcp-nestedmorph / hcp-voxelmorph)")
        values = read_yaml(config)
        if checkpoint.suffix == ".safetensors":
            st = require("safetensors.torch", extra="all")
            try:
                state = st.load_file(str(checkpoint))
            except Exception as exc:
                raise DataFormatError(f"--checkpoint {checkpoint}: not readable as safetensors ({exc})") from exc
        else:
            state = load_checkpoint(checkpoint)
    cfg = config_from_dict(RegistrationConfig, values)
    if cfg.method not in ("nestedmorph", "voxelmorph"):
        raise ConfigError(f"--checkpoint {checkpoint}: method {cfg.method!r} has no network")
    net = build_network(cfg)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataFormatError(f"--checkpoint {checkpoint}: weights do not match a {cfg.method} network "
                              f"with the run's config ({str(exc).splitlines()[0]})") from exc
    return net.to(device).eval(), int(cfg.data.size)


def _similarity(moving: Tensor, fixed: Tensor, tag: str) -> dict[str, float]:
    from threefold.medical.registration.evaluation import mutual_information
    from threefold.medical.similarity import ncc, ssim3d
    from threefold.pipelines.metrics.registration import MI, NCC, SSIM

    m, f = moving[None].float(), fixed[None].float()
    return {f"{SSIM}/{tag}": float(ssim3d(m, f, data_range=1.0)[0]), f"{NCC}/{tag}": float(ncc(m, f)[0]),
            f"{MI}/{tag}": float(mutual_information(m, f, bins=32)[0])}


def register_files(moving: Path, fixed: Path, out: Path, *, checkpoint: Path | None = None,
                   method: str = "bspline", size: int = 64, prealign: str = "rigid",
                   moving_mask: Path | None = None, fixed_mask: Path | None = None,
                   iterations: int | None = None, affine_iterations: int = 300, device: str | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the results to ``out`` (see the module docstring).

    Returns the metrics written to ``out/metrics.json``.
    """
    from threefold.medical.registration.affine import AffinePrealign
    from threefold.medical.registration.outputs import fixed_space_outputs, write_outputs
    from threefold.pipelines.engine import write_metrics
    from threefold.pipelines.metrics.registration import registration_pair_metrics

    if prealign not in PREALIGN:
        raise ConfigError(f"--prealign {prealign!r}; expected one of {PREALIGN}")
    if checkpoint is None and method not in METHODS:
        raise ConfigError(f"--method {method!r}; expected one of {METHODS} (or pass --checkpoint)")
    start = time.perf_counter()
    mov, fix = _read_volume(Path(moving), "moving"), _read_volume(Path(fixed), "fixed")
    _check_dimensionality(mov, fix)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = None
    if checkpoint is not None:
        net, size = load_network(Path(checkpoint), dev)
    pair: dict[str, Any] = {"moving": mov["image"], "moving_affine": mov["affine"], "fixed": fix["image"],
                            "fixed_affine": fix["affine"], "subject": Path(moving).name}
    for key, path, ref in (("moving_mask", moving_mask, mov), ("fixed_mask", fixed_mask, fix)):
        mask = _read_mask(None if path is None else Path(path), ref, key.replace("_", "-"))
        if mask is not None:
            pair[key] = mask
    step = None if prealign == "none" else AffinePrealign(prealign, iterations=affine_iterations, seed=seed)
    chain = default_pair_transform(size, step)
    grid_pair = chain(pair)

    m_grid, f_grid = grid_pair["moving"][None], grid_pair["fixed"][None]  # (1, 1, S, S, S)
    if net is not None:
        with torch.no_grad():
            ddf = net(m_grid.to(dev), f_grid.to(dev)).ddf.float().cpu()
    else:
        ddf = register_classical_step(grid_pair, method, iterations, seed)
    metrics: dict[str, Any] = {
        "moving": str(moving), "fixed": str(fixed),
        "method": f"checkpoint:{checkpoint}" if checkpoint is not None else method,
        "prealign": prealign, "prealign_matrix": grid_pair["prealign"].tolist(),
        "grid_size": list(grid_pair["moving"].shape[1:]),
        "grid_spacing_mm": float(np.linalg.norm(grid_pair["affine"][:3, 0].numpy())),
    }
    # "initial": the moving image on the grid without any transform, normalised as the others
    initial = PairCompose(chain.transforms[-3:])({**pair, "prealign": torch.eye(4, dtype=torch.float64)})
    metrics.update(_similarity(initial["moving"], grid_pair["fixed"], "initial"))
    spacing = tuple(float(s) for s in np.linalg.norm(grid_pair["affine"][:3, :3].numpy(), axis=0))
    metrics.update(registration_pair_metrics(m_grid, f_grid, ddf, spacing))

    fixed_shape, fixed_affine = _original_geometry(Path(fixed))
    outputs = fixed_space_outputs(mov["image"], mov["affine"], fixed_shape, fixed_affine, grid_pair["affine"], ddf[0],
                                  grid_pair["prealign"])
    out = Path(out)
    paths = write_outputs(out, outputs, fixed_affine)
    metrics["files"] = {k: str(v) for k, v in paths.items()}
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_metrics(out / "metrics.json", metrics)
    return metrics


def register_classical_step(grid_pair: dict[str, Any], method: str, iterations: int | None, seed: int) -> Tensor:
    """The SimpleITK deformable step on the training grid → ``(1, 3, S, S, S)`` voxels."""
    from threefold.medical.registration.classical import register_classical

    return register_classical(grid_pair["moving"], grid_pair["fixed"], method, iterations=iterations, seed=seed)[None]


def _original_geometry(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the fixed file as stored (before any reorientation): the output geometry."""
    nib = require("nibabel", extra="medical")
    img = nib.load(path)
    return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)

