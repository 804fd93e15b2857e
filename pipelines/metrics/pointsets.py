"""Point-set accumulator: Chamfer distance, normal consistency and F-score, wrapping
:mod:`threefold.geometry.chamfer` (see there for which paper uses which Chamfer convention).

Reports the **mean over clouds** of each per-cloud value, so its states are sums and counts,
summed across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.geometry.chamfer import chamfer_distance, fscore, normal_consistency


class PointSetMetrics(Metric):
    """Mean Chamfer distance (named convention), normal consistency and F-score over point clouds.

    States, all reduced by **sum**: ``cd_sum``, ``fscore_sum``, ``nc_sum`` (float64 scalars),
    ``count`` and ``nc_count`` (int64; normal consistency only counts clouds updated with normals).

    ``update(x, y, nx=None, ny=None)``: prediction ``x`` ``(B, N, 3)`` and reference ``y``
    ``(B, M, 3)``, optional normals of the same shapes. ``compute()`` returns
    ``{"CD[squared=<s>,reduction=<r>]": scalar, "F@<threshold>": scalar}`` plus ``"NC"`` when
    normals were given. CD is in squared units when ``squared`` else in the coordinates' unit.
    """

    full_state_update = False

    def __init__(
        self, squared: bool = True, reduction: str = "sum", fscore_threshold: float = 0.01, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"PointSetMetrics: reduction={reduction!r}; expected 'sum' or 'mean'")
        if not fscore_threshold > 0:
            raise ConfigError(f"PointSetMetrics: fscore_threshold={fscore_threshold!r}; expected > 0")
        self.squared = squared
        self.reduction = reduction
        self.fscore_threshold = float(fscore_threshold)
        for name in ("cd_sum", "fscore_sum", "nc_sum"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("count", "nc_count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, y: Tensor, nx: Tensor | None = None, ny: Tensor | None = None) -> None:
        if x.ndim != 3 or y.ndim != 3:
            raise DataFormatError(
                f"PointSetMetrics: clouds of shapes {tuple(x.shape)}, {tuple(y.shape)}; "
                "expected (B, N, 3) and (B, M, 3)"
            )
        if (nx is None) != (ny is None):
            raise DataFormatError("PointSetMetrics: give normals for both clouds (nx and ny) or for neither")
        if x.shape[0] == 0:
            return
        x, y = x.detach(), y.detach()
        cd = chamfer_distance(x, y, squared=self.squared, reduction=self.reduction)
        self.cd_sum += cd.double().sum().to(self.cd_sum.device)
        self.fscore_sum += fscore(x, y, self.fscore_threshold).double().sum().to(self.fscore_sum.device)
        self.count += x.shape[0]
        if nx is not None:
            self.nc_sum += normal_consistency(x, nx.detach(), y, ny.detach()).double().sum().to(self.nc_sum.device)
            self.nc_count += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        out = {
            f"CD[squared={self.squared},reduction={self.reduction}]": self.cd_sum / n,
            f"F@{self.fscore_threshold:g}": self.fscore_sum / n,
        }
        if self.nc_count > 0:
            out["NC"] = self.nc_sum / self.nc_count.double()
        return out
