"""Sliding-window inference with Gaussian blending and flip test-time augmentation.

Whole-volume prediction as in Isensee et al. 2017 / Hu et al. 2018: the network sees patches of the
training size; windows overlap by 50 % and are blended with a Gaussian importance map
(sigma = 0.125 × window size, MONAI's default), which down-weights the less reliable window borders.
Optional test-time augmentation averages the predictions of the input mirrored along every subset
of the three spatial axes (8 passes). MONAI's ``sliding_window_inference`` does the tiling; it is
imported inside the function (extra ``medical``).

What is averaged is the head's ``scores`` (see :mod:`threefold.medical.segmentation.heads`): for the
multi-level head that is the single channel ``z``, so the averaged prediction stays nested.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
from torch import Tensor

from threefold.datasets.errors import require


def sliding_window_predict(
    image: Tensor,
    predictor: Callable[[Tensor], Tensor],
    roi_size: Sequence[int],
    overlap: float = 0.5,
    flip_tta: bool = False,
    sw_batch_size: int = 2,
) -> Tensor:
    """Blend ``predictor`` over windows of ``roi_size`` covering ``image``.

    ``image`` (B, C, D, H, W) float on any device; ``predictor`` maps (n, C, *roi_size) ->
    (n, K, *roi_size) (typically ``lambda x: head.scores(net(x))``). Returns (B, K, D, H, W) on
    ``image``'s device. Volumes smaller than ``roi_size`` are padded by MONAI and cropped back.
    With ``flip_tta`` the result is the mean over the 8 mirrorings, each un-mirrored before averaging.
    """
    inferers = require("monai.inferers", extra="medical")

    def run(x: Tensor) -> Tensor:
        return inferers.sliding_window_inference(
            x, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode="gaussian"
        )

    if not flip_tta:
        return run(image)
    total = None
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]
    for axes in flips:
        out = run(image.flip(axes) if axes else image)
        out = out.flip(axes) if axes else out
        total = out if total is None else total + out
    return total / len(flips)
