"""Feeding accumulators only real samples under a padding ``DistributedSampler``.

``torch.utils.data.DistributedSampler(drop_last=False)`` (what Lightning installs for evaluation
under DDP) pads the index list to a multiple of the world size W by repeating its first indices,
then gives rank r the positions r, r + W, r + 2W, … of the padded list. Summing accumulator states
across ranks would count the repeated samples twice. Which positions are padding is known without
communication: the k-th sample of rank r sits at global position ``r + k W`` of the padded list, and
the positions at or beyond ``len(dataset)`` are the padding — whatever the shuffling, because the
sampler shuffles before padding.

Usage in an evaluation step (a ``DataLoader`` with ``batch_size=b`` over that sampler)::

    real = batch_real_mask(sampler, batch_idx, b, len(batch["target"]), device=pred.device)
    metric.update(pred[real], target[real])

For batches that concatenate variable-size samples (points of several clouds with a ``batch``
index vector), expand the per-sample mask to elements: ``real[batch_index]``.
"""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, Sampler

from threefold.datasets.errors import ConfigError


def real_sample_mask(sampler: Sampler, device: torch.device | str | None = None) -> Tensor:
    """``(len(sampler),)`` bool, True where this rank's k-th sample is real, False where padding.

    A sampler that is not a ``DistributedSampler`` pads nothing: all True.
    Raises :class:`ConfigError` for ``drop_last=True`` with a remainder, which silently leaves
    samples out of the evaluation.
    """
    if not isinstance(sampler, DistributedSampler):
        if not isinstance(sampler, Sized):
            raise ConfigError(f"real_sample_mask: sampler {type(sampler).__name__} has no length")
        return torch.ones(len(sampler), dtype=torch.bool, device=device)
    n = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.drop_last and n % sampler.num_replicas:
        raise ConfigError(
            f"real_sample_mask: DistributedSampler(drop_last=True) leaves {n % sampler.num_replicas} of {n} samples "
            "out of the evaluation; use drop_last=False and this mask"
        )
    position = sampler.rank + sampler.num_replicas * torch.arange(sampler.num_samples, device=device)
    return position < n


def batch_real_mask(
    sampler: Sampler, batch_idx: int, batch_size: int, batch_len: int, device: torch.device | str | None = None
) -> Tensor:
    """``(batch_len,)`` bool real-sample mask of batch ``batch_idx`` of a ``DataLoader(sampler=sampler,
    batch_size=batch_size, drop_last=False)``; ``batch_len`` is the actual length of that batch (the
    last one may be shorter)."""
    mask = real_sample_mask(sampler, device=device)
    start = batch_idx * batch_size
    if start + batch_len > len(mask):
        raise ConfigError(
            f"batch_real_mask: batch {batch_idx} of size {batch_len} (batch_size={batch_size}) runs past the "
            f"{len(mask)} samples of this rank"
        )
    return mask[start : start + batch_len]
