"""Batching of samples: ragged point clouds concatenated with an ``offset``, volumes stacked.

Point-cloud batches follow Pointcept (Wu et al., "Point Transformer V3", CVPR 2024; Pointcept's
``point_collate_fn``): the points of all samples are concatenated, never padded to a maximum N, and
``offset`` (B,) int64 holds the cumulative point counts, so sample ``b`` owns rows
``offset[b-1]:offset[b]`` (with ``offset[-1] := 0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from threefold.datasets.errors import DataFormatError

# Per-point fields concatenated along dim 0; everything else is kept as a per-sample list.
POINT_FIELDS: tuple[str, ...] = ("coord", "feat", "label", "label_raw", "normal", "instance")
# Per-voxel fields stacked into (B, C, D, H, W); geometry is kept per sample.
VOLUME_FIELDS: tuple[str, ...] = ("image", "label")


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataFormatError(f"{where}: expected a tensor or array, got {type(value).__name__}") from exc


def collate_points(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate point-cloud samples into one ragged batch.

    Each sample holds ``coord`` (N_b, 3) float32 metres and optionally ``feat`` (N_b, C),
    ``label`` (N_b,) int64 (ignore index -1), ``normal`` (N_b, 3), ``instance`` (N_b,). Returns those fields
    concatenated to (ΣN_b, ...), ``offset`` (B,) int64 cumulative counts on the device of ``coord``, and
    every other key as a list of length B. A per-point field present in some samples but not others,
    or a row count that differs from the sample's ``coord``, raises :class:`DataFormatError`.
    """
    if len(samples) == 0:
        raise DataFormatError("collate_points: got an empty list of samples")
    keys = set(samples[0])
    for b, s in enumerate(samples):
        if "coord" not in s:
            raise DataFormatError(f"collate_points: sample {b} has no 'coord' field")
        if set(s) != keys:
            raise DataFormatError(f"collate_points: sample {b} has fields {sorted(s)}, sample 0 has {sorted(keys)}")
    counts = []
    for b, s in enumerate(samples):
        coord = _as_tensor(s["coord"], f"collate_points: sample {b} 'coord'")
        if coord.ndim != 2 or coord.shape[1] != 3:
            raise DataFormatError(f"collate_points: sample {b} 'coord' has shape {tuple(coord.shape)}, expected (N, 3)")
        counts.append(coord.shape[0])
    batch: dict[str, Any] = {}
    for key in sorted(keys):
        if key not in POINT_FIELDS:
            batch[key] = [s[key] for s in samples]
            continue
        parts = [_as_tensor(s[key], f"collate_points: sample {b} {key!r}") for b, s in enumerate(samples)]
        for b, (part, n) in enumerate(zip(parts, counts)):
            if part.ndim == 0 or part.shape[0] != n:
                raise DataFormatError(
                    f"collate_points: sample {b} {key!r} has shape {tuple(part.shape)}, expected {n} rows like its 'coord'"
                )
            if part.shape[1:] != parts[0].shape[1:] or part.dtype != parts[0].dtype:
                raise DataFormatError(
                    f"collate_points: sample {b} {key!r} is {tuple(part.shape[1:])} {part.dtype}, "
                    f"sample 0 is {tuple(parts[0].shape[1:])} {parts[0].dtype}"
                )
        batch[key] = torch.cat(parts, dim=0)
    device = batch["coord"].device
    batch["offset"] = torch.cumsum(torch.tensor(counts, dtype=torch.int64, device=device), dim=0)
    return batch


def _check_offset(offset: torch.Tensor, total: int) -> None:
    if offset.ndim != 1 or offset.dtype != torch.int64:
        raise DataFormatError(f"offset: expected a (B,) int64 tensor, got {tuple(offset.shape)} {offset.dtype}")
    if offset.numel() and (bool((offset[1:] < offset[:-1]).any()) or int(offset[0]) < 0 or int(offset[-1]) != total):
        raise DataFormatError(f"offset: expected non-decreasing cumulative counts ending at {total}, got {offset.tolist()}")
    if offset.numel() == 0 and total != 0:
        raise DataFormatError(f"offset: empty, but the tensor has {total} rows")


def split_by_offset(values: torch.Tensor, offset: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of the concatenation in :func:`collate_points`: per-sample views of ``values`` (ΣN_b, ...)."""
    _check_offset(offset, values.shape[0])
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return list(torch.split(values, counts.tolist(), dim=0))


def offset_to_batch(offset: torch.Tensor) -> torch.Tensor:
    """Sample index of every point, (ΣN_b,) int64, from ``offset`` (B,) (Pointcept's ``offset2batch``)."""
    _check_offset(offset, int(offset[-1]) if offset.numel() else 0)
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(offset.numel(), device=offset.device), counts)


def batch_to_offset(batch: torch.Tensor) -> torch.Tensor:
    """``offset`` (B,) int64 from a sorted per-point sample index (N,) (Pointcept's ``batch2offset``).

    B is ``batch.max() + 1``; samples with no points get a repeated offset.
    """
    if batch.ndim != 1:
        raise DataFormatError(f"batch: expected a (N,) tensor of sample indices, got shape {tuple(batch.shape)}")
    if batch.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=batch.device)
    if bool((batch[1:] < batch[:-1]).any()) or int(batch[0]) < 0:
        raise DataFormatError("batch: sample indices must be non-negative and sorted (points grouped by sample)")
    return torch.cumsum(torch.bincount(batch), dim=0).to(torch.int64)


def collate_volumes(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack volume samples: ``image`` (C, D, H, W) → (B, C, D, H, W), likewise ``label``.

    ``affine`` (4, 4) float64 and ``spacing`` (3,) float64 (millimetres) stay per-sample lists, since each
    case keeps its own geometry, as does every other key. Images of different shapes raise
    :class:`DataFormatError` (crop or pad them first with :mod:`threefold.datasets.transforms`).
    """
    if len(samples) == 0:
        raise DataFormatError("collate_volumes: got an empty list of samples")
    keys = set(samples[0])
    for b, s in enumerate(samples):
        if "image" not in s:
            raise DataFormatError(f"collate_volumes: sample {b} has no 'image' field")
        if set(s) != keys:
            raise DataFormatError(f"collate_volumes: sample {b} has fields {sorted(s)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in sorted(keys):
        if key not in VOLUME_FIELDS:
            batch[key] = [s[key] for s in samples]
            continue
        parts = [_as_tensor(s[key], f"collate_volumes: sample {b} {key!r}") for b, s in enumerate(samples)]
        for b, part in enumerate(parts):
            if part.ndim != 4:
                raise DataFormatError(
                    f"collate_volumes: sample {b} {key!r} has shape {tuple(part.shape)}, expected (C, D, H, W)"
                )
            if part.shape != parts[0].shape:
                raise DataFormatError(
                    f"collate_volumes: sample {b} {key!r} has shape {tuple(part.shape)}, sample 0 has "
                    f"{tuple(parts[0].shape)}; crop or pad to one size before batching"
                )
        batch[key] = torch.stack(parts, dim=0)
    return batch
