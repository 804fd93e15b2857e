"""Volume accumulators: per-region Dice and HD95 (mm) of 3D segmentations, and SSIM / NCC of
intensity volumes, wrapping :mod:`threefold.medical.overlap` and :mod:`threefold.medical.similarity`.

Both report the **mean over volumes** of the per-volume value (the BraTS and Learn2Reg tables'
convention), so their states are per-region sums and a volume count, summed across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.medical.overlap import dice, hausdorff95, hausdorff95_pooled
from threefold.medical.similarity import ncc, ssim3d

HD95_CONVENTIONS = {"directed": "HD95[max-directed]", "pooled": "HD95[pooled]"}


def _to_numpy(spacing: Sequence[float] | Tensor | np.ndarray) -> np.ndarray:
    return spacing.detach().cpu().numpy() if isinstance(spacing, Tensor) else np.asarray(spacing)


class SegmentationOverlapMetrics(Metric):
    """Mean Dice and HD95 per region, with the BraTS empty-mask rules of :mod:`threefold.medical.overlap`.

    States (float64 ``(R,)`` sums over volumes, int64 volume count), all reduced by **sum**:
    ``dice_sum``, ``hd95_sum``, ``count``.

    ``update(pred, target, spacing=None)``: ``(B, R, D, H, W)`` bool masks, one channel per region
    (e.g. BraTS WT / TC / ET); ``spacing`` in mm, ``(3,)`` or ``(B, 3)``, defaults to the
    constructor's. ``compute()`` returns ``{"Dice/<region>": scalar, "<HD95 name>/<region>": scalar (mm)}``
    where the HD95 name is ``"HD95[max-directed]"`` (MONAI) or ``"HD95[pooled]"`` (medpy).
    """

    full_state_update = False

    def __init__(
        self,
        regions: Sequence[str],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        hd95: str = "directed",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if hd95 not in HD95_CONVENTIONS:
            raise ConfigError(f"SegmentationOverlapMetrics: hd95={hd95!r}; expected one of {tuple(HD95_CONVENTIONS)}")
        if len(regions) == 0:
            raise ConfigError("SegmentationOverlapMetrics: regions is empty; expected at least one region name")
        self.regions = list(regions)
        self.spacing = tuple(float(s) for s in spacing)
        self.hd95 = hd95
        r = len(self.regions)
        self.add_state("dice_sum", default=torch.zeros(r, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hd95_sum", default=torch.zeros(r, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self, pred: Tensor, target: Tensor, spacing: Sequence[float] | Tensor | np.ndarray | None = None
    ) -> None:
        if pred.ndim != 5 or pred.shape[1] != len(self.regions):
            raise DataFormatError(
                f"SegmentationOverlapMetrics: masks of shape {tuple(pred.shape)}; "
                f"expected (B, {len(self.regions)}, D, H, W) "
                f"for regions {self.regions}"
            )
        sp = np.asarray(self.spacing if spacing is None else _to_numpy(spacing), dtype=np.float64)
        if sp.ndim == 2:
            sp = np.broadcast_to(sp[:, None, :], (sp.shape[0], pred.shape[1], 3))  # per volume, shared by its regions
        hd_fn = hausdorff95 if self.hd95 == "directed" else hausdorff95_pooled
        self.dice_sum += dice(pred, target).double().sum(dim=0).to(self.dice_sum.device)
        self.hd95_sum += hd_fn(pred, target, sp).sum(dim=0).to(self.hd95_sum.device)
        self.count += pred.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        hd_name = HD95_CONVENTIONS[self.hd95]
        out = {f"Dice/{r}": v for r, v in zip(self.regions, self.dice_sum / n)}
        out.update({f"{hd_name}/{r}": v for r, v in zip(self.regions, self.hd95_sum / n)})
        return out


class ImageSimilarityMetrics(Metric):
    """Mean 3D SSIM and global NCC over volumes.

    States: ``ssim_sum``, ``ncc_sum`` (float64 scalars) and ``count`` (int64), reduced by **sum**.
    ``update(x, y)``: ``(B, C, D, H, W)`` float volumes. ``compute()`` returns
    ``{"SSIM3D[win=7,data_range=<r>]": scalar, "NCC[global]": scalar}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, data_range: float, win_size: int = 7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not data_range > 0:
            raise ConfigError(f"ImageSimilarityMetrics: data_range={data_range!r}; expected a positive intensity range")
        self.data_range = float(data_range)
        self.win_size = win_size
        self.add_state("ssim_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ncc_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, y: Tensor) -> None:
        if x.ndim != 5:
            raise DataFormatError(
                f"ImageSimilarityMetrics: volumes of shape {tuple(x.shape)}; expected (B, C, D, H, W)"
            )
        if x.shape[0] == 0:
            return
        self.ssim_sum += ssim3d(x, y, self.data_range, win_size=self.win_size).double().sum().to(self.ssim_sum.device)
        self.ncc_sum += ncc(x, y).double().sum().to(self.ncc_sum.device)
        self.count += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        return {
            f"SSIM3D[win={self.win_size},data_range={self.data_range:g}]": self.ssim_sum / n,
            "NCC[global]": self.ncc_sum / n,
        }
