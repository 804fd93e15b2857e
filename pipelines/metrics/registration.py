"""Per-pair registration metrics (issue #6, section 3) and their mean ± std summary.

Every key names its convention:

==========================================  ==================================================================
``SSIM3D[win=7,data_range=1]/{before,after}``  3D SSIM of (moving | warped) vs fixed, both in [0, 1]
``NCC[global]/{before,after}``                 Pearson correlation of all voxels
``MI[hist32,nats]/{before,after}``             histogram mutual information, 32 bins on [0, 1]
``Dice[labels]/{before,after}``                mean Dice over the tissue labels (warped labels: nearest)
``HD95[max-directed,mm]/{before,after}``       mean over labels of MONAI's HD95 in mm (header spacing)
``HD95[paper:threshold=0.5,slicewise,vox]``    the NestedMorph paper's intensity-threshold HD95, after
``Jacobian/{mean,min,max}``                    det(I + ∇u) of the recovered field
``folding%[J<=0]``                             percentage of voxels with J ≤ 0
``SDlogJ[positive]``, ``SDlogJ[learn2reg]``     both named conventions of :mod:`threefold.medical.deformation`
``EPE[vox,brain]/{before,after}``              mean ‖u − u_true‖ over the fixed brain (label > 0); before = identity
``EPE[vox,all]/after``                         the same over every voxel
==========================================  ==================================================================

"before" is the identity transform applied to the (affinely pre-aligned) moving image, i.e. the
affine-only baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from threefold.medical.deformation import folding_percentage, jacobian_determinant, sdlogj
from threefold.medical.overlap import dice, hausdorff95
from threefold.medical.registration.evaluation import endpoint_error, hd95_threshold_slicewise, mutual_information
from threefold.medical.registration.warp import warp
from threefold.medical.similarity import ncc, ssim3d

SSIM = "SSIM3D[win=7,data_range=1]"
NCC = "NCC[global]"
MI = "MI[hist32,nats]"
DICE = "Dice[labels]"
HD95_MM = "HD95[max-directed,mm]"
HD95_PAPER = "HD95[paper:threshold=0.5,slicewise,vox]"
EPE_BRAIN = "EPE[vox,brain]"
EPE_ALL = "EPE[vox,all]"


def spacing_from_affine(affine: Tensor | np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along (D, H, W): the column norms of the affine's 3 × 3 block."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def _label_scores(pred: Tensor, target: Tensor, labels: Mapping[str, int], spacing: tuple[float, float, float]) -> tuple[float, float, dict[str, float]]:
    """Mean Dice and mean HD95 (mm) over the labels present in ``target``, plus per-label Dice."""
    codes = {n: c for n, c in labels.items() if c != 0 and bool((target == c).any())}
    p = torch.stack([pred == c for c in codes.values()])
    t = torch.stack([target == c for c in codes.values()])
    d = dice(p, t)
    h = hausdorff95(p, t, spacing)
    return float(d.mean()), float(h.mean()), {f"Dice/{n}": float(v) for n, v in zip(codes, d)}


@torch.no_grad()
def registration_pair_metrics(
    moving: Tensor,
    fixed: Tensor,
    ddf: Tensor,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    moving_label: Tensor | None = None,
    fixed_label: Tensor | None = None,
    labels: Mapping[str, int] | None = None,
    ddf_true: Tensor | None = None,
) -> dict[str, float]:
    """All metrics of one registered pair.

    Args:
        moving, fixed: ``(1, 1, D, H, W)`` float volumes in [0, 1] (moving already affinely aligned).
        ddf: ``(1, 3, D, H, W)`` recovered displacement in voxels (MONAI ``Warp`` convention).
        spacing: mm per voxel along (D, H, W), for HD95 in mm.
        moving_label, fixed_label: optional ``(1, 1, D, H, W)`` int64 label maps (0 = background).
        labels: ``{name: code}`` of the label maps (codes absent from ``fixed_label`` are skipped).
        ddf_true: optional ``(1, 3, D, H, W)`` true displacement (voxels).

    Returns:
        ``{metric name: float}`` with the names of the module table.
    """
    warped = warp(moving, ddf)
    row: dict[str, float] = {}
    for tag, image in (("before", moving), ("after", warped)):
        row[f"{SSIM}/{tag}"] = float(ssim3d(image, fixed, data_range=1.0)[0])
        row[f"{NCC}/{tag}"] = float(ncc(image, fixed)[0])
        row[f"{MI}/{tag}"] = float(mutual_information(image, fixed, bins=32)[0])
    row[HD95_PAPER] = float(hd95_threshold_slicewise(warped, fixed)[0])
    if moving_label is not None and fixed_label is not None:
        names = labels or {str(int(c)): int(c) for c in torch.unique(fixed_label).tolist()}
        warped_label = warp(moving_label, ddf, mode="nearest")
        for tag, lab in (("before", moving_label), ("after", warped_label)):
            d, h, per_label = _label_scores(lab[0, 0], fixed_label[0, 0], names, spacing)
            row[f"{DICE}/{tag}"], row[f"{HD95_MM}/{tag}"] = d, h
        row.update(per_label)  # after registration
    jac = jacobian_determinant(ddf[0].double())
    row["Jacobian/mean"], row["Jacobian/min"], row["Jacobian/max"] = float(jac.mean()), float(jac.min()), float(jac.max())
    row["folding%[J<=0]"] = float(folding_percentage(jac))
    for convention in ("positive", "learn2reg"):
        row[f"SDlogJ[{convention}]"] = float(sdlogj(jac, convention).value)
    if ddf_true is not None:
        brain = (fixed_label > 0) if fixed_label is not None else None
        row[f"{EPE_BRAIN}/before"] = float(endpoint_error(torch.zeros_like(ddf), ddf_true, brain)[0])
        row[f"{EPE_BRAIN}/after"] = float(endpoint_error(ddf, ddf_true, brain)[0])
        row[f"{EPE_ALL}/after"] = float(endpoint_error(ddf, ddf_true)[0])
    return row


def summarize_pairs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``"<metric>/mean"`` and ``"<metric>/std"`` (population std) over pairs of every numeric column
    (NaN entries, e.g. a threshold HD95 without foreground, are left out of that column)."""
    out: dict[str, float] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if not values or key == "pair":
            continue
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        out[f"{key}/mean"] = float(v.mean()) if v.size else float("nan")
        out[f"{key}/std"] = float(v.std()) if v.size else float("nan")
    return out
