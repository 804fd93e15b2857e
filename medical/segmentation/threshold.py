"""Intensity-threshold baseline for WT / TC / ET: one threshold per region on one modality.

The reference point of the acceptance test of Hu et al. 2018's method on the synthetic phantoms: for
each region, every candidate (modality among the allowed ones, direction ``>`` or ``<``, threshold)
is scored by the mean per-case Dice over the *training* cases and the best is kept; applied voxel-wise
inside the brain. Nothing ties the three decisions together, so it may break the nesting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RegionThreshold:
    """``region k`` = ``sign * image[channel] > sign * value`` inside the brain."""

    channel: int
    sign: float
    value: float
    train_dice: float


def _dice_curve(v: np.ndarray, t: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of ``v > th`` against ``t`` for every ``th`` (sorting, no loop over voxels)."""
    order = np.argsort(v)
    vs, ts = v[order], t[order].astype(np.int64)
    above_true = ts.sum() - np.concatenate([[0], np.cumsum(ts)])  # true voxels with index >= i
    idx = np.searchsorted(vs, thresholds, side="right")  # first voxel > th
    pred = len(vs) - idx
    inter = above_true[idx]
    denom = pred + ts.sum()
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def fit_region_thresholds(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channels: Sequence[int], n_candidates: int = 200
) -> list[RegionThreshold]:
    """Tune one threshold per region (WT, TC, ET) on training cases.

    ``images`` (C, I, J, K) float z-scored volumes (0 outside the brain), ``labels`` ordinal (I, J, K);
    ``channels`` the modality indices allowed (FLAIR and T1ce in the acceptance protocol). Candidates
    are ``n_candidates`` quantiles of the pooled brain intensities of each channel.
    """
    brains = [np.any(im != 0, 0) for im in images]
    out = []
    for level in (1, 2, 3):
        best = RegionThreshold(channels[0], 1.0, np.inf, -1.0)
        for ch in channels:
            pooled = np.concatenate([im[ch][m] for im, m in zip(images, brains)])
            cands = np.quantile(pooled, np.linspace(0.0, 1.0, n_candidates))
            for sign in (1.0, -1.0):
                scores = np.mean(
                    [_dice_curve(sign * im[ch][m], y[m] >= level, sign * cands) for im, y, m in zip(images, labels, brains)],
                    axis=0,
                )
                i = int(np.argmax(scores))
                if scores[i] > best.train_dice:
                    best = RegionThreshold(int(ch), sign, float(cands[i]), float(scores[i]))
        out.append(best)
    return out


def apply_region_thresholds(image: np.ndarray, rules: Sequence[RegionThreshold]) -> np.ndarray:
    """(C, I, J, K) z-scored image -> (3, I, J, K) bool region masks (WT, TC, ET), false outside the brain."""
    brain = np.any(image != 0, 0)
    return np.stack([(r.sign * image[r.channel] > r.sign * r.value) & brain for r in rules])
