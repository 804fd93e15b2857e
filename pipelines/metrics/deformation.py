"""Deformation-field accumulator: folding percentage and SDlogJ in both conventions, wrapping
:mod:`threefold.medical.deformation`.

Reports the **mean over volumes** of each per-volume value (Learn2Reg's convention), so its
states are sums and a volume count, summed across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from threefold.datasets.errors import DataFormatError
from threefold.medical.deformation import SDLOGJ_CONVENTIONS, folding_percentage, jacobian_determinant, sdlogj


class DeformationMetrics(Metric):
    """Mean folding percentage (J ≤ 0) and mean SDlogJ, both conventions, of displacement fields.

    States (float64 scalars, int64 count), all reduced by **sum**: ``folding_sum``,
    ``sdlogj_positive_sum``, ``sdlogj_learn2reg_sum``, ``count``.

    ``update(disp)``: ``(B, 3, D, H, W)`` displacement in voxels (channel i along spatial axis i).
    ``compute()`` returns ``{"folding%[J<=0]": scalar (percent), "SDlogJ[positive]": scalar,
    "SDlogJ[learn2reg]": scalar}``; a volume without any J > 0 makes ``SDlogJ[positive]`` NaN.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("folding_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for convention in SDLOGJ_CONVENTIONS:
            self.add_state(
                f"sdlogj_{convention}_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.add_state("count", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, disp: Tensor) -> None:
        if disp.ndim != 5:
            raise DataFormatError(
                f"DeformationMetrics: displacement of shape {tuple(disp.shape)}; expected (B, 3, D, H, W)"
            )
        if disp.shape[0] == 0:
            return
        jac = jacobian_determinant(disp.detach())
        self.folding_sum += folding_percentage(jac).double().sum().to(self.folding_sum.device)
        for convention in SDLOGJ_CONVENTIONS:
            state = getattr(self, f"sdlogj_{convention}_sum")
            state += sdlogj(jac, convention).value.double().sum().to(state.device)
        self.count += disp.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        out = {"folding%[J<=0]": self.folding_sum / n}
        out.update({f"SDlogJ[{c}]": getattr(self, f"sdlogj_{c}_sum") / n for c in SDLOGJ_CONVENTIONS})
        return out
