"""A few seeded transforms that keep the sample conventions of ``datasets/README.md``.

Every transform is a callable ``t(sample, generator) -> sample`` that returns a new dict (the input is
not modified) and draws all randomness from ``generator`` (a ``torch.Generator``, on the CPU or the
device of the data), so a run is reproducible from its seed.

Points (``coord`` (N, 3) float32 metres; ``normal`` (N, 3) is rotated/flipped along when present):
the usual outdoor LiDAR augmentations of Pointcept / Point Transformer V3 (Wu et al., CVPR 2024):
rotation about z, scaling, mirroring, clipped Gaussian jitter.

Volumes (``image`` (C, D, H, W), optional ``label`` (1, D, H, W), ``affine`` (4, 4) float64): crops and
pads move the voxel grid, so they update ``affine`` — new voxel ``v`` is old voxel ``v + start`` (crop) or
``v - before`` (pad) — and a prediction on the transformed grid maps to the same world points. Centre
and symmetric conventions match MONAI's ``CenterSpatialCrop`` and ``SpatialPad``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from threefold.datasets.errors import ConfigError, DataFormatError

Sample = dict[str, Any]
Transform = Callable[[Sample, torch.Generator], Sample]
IGNORE_INDEX = -1


class Compose:
    """Apply transforms in order with one shared generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        out = dict(sample)
        for t in self.transforms:
            out = t(out, generator)
        return out


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
    u = torch.rand(size, generator=generator, device=generator.device, dtype=torch.float64)
    return low + (high - low) * u


def _coord(sample: Mapping[str, Any]) -> torch.Tensor:
    coord = sample.get("coord")
    if not isinstance(coord, torch.Tensor) or coord.ndim != 2 or coord.shape[1] != 3:
        got = tuple(coord.shape) if isinstance(coord, torch.Tensor) else type(coord).__name__
        raise DataFormatError(f"point transform: 'coord' must be an (N, 3) tensor, got {got}")
    return coord


def _apply_linear(sample: Mapping[str, Any], matrix: torch.Tensor, to_normals: torch.Tensor | None = None) -> Sample:
    """coord ← coord @ matrixᵀ; normals by ``to_normals`` (the inverse transpose, for non-rigid maps)."""
    out = dict(sample)
    coord = _coord(sample)
    m = matrix.to(device=coord.device, dtype=coord.dtype)
    out["coord"] = coord @ m.T
    normal = sample.get("normal")
    if isinstance(normal, torch.Tensor):
        n = (to_normals if to_normals is not None else matrix).to(device=normal.device, dtype=normal.dtype)
        rotated = normal @ n.T
        out["normal"] = rotated / rotated.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


class RandomRotateZ:
    """Rotate about the z axis (up) by an angle uniform in ``angle`` (radians)."""

    def __init__(self, angle: tuple[float, float] = (-math.pi, math.pi)) -> None:
        self.angle = angle

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        a = _uniform(generator, *self.angle)
        c, s = torch.cos(a), torch.sin(a)
        zero, one = torch.zeros_like(a), torch.ones_like(a)
        rot = torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero]), torch.stack([zero, zero, one])])
        return _apply_linear(sample, rot)


class RandomScale:
    """Scale coordinates by a factor uniform in ``[low, high]`` (one per axis if ``anisotropic``)."""

    def __init__(self, low: float = 0.9, high: float = 1.1, anisotropic: bool = False) -> None:
        if not 0 < low <= high:
            raise ConfigError(f"RandomScale: expected 0 < low <= high, got low={low}, high={high}")
        self.low, self.high, self.anisotropic = low, high, anisotropic

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        k = _uniform(generator, self.low, self.high, (3,) if self.anisotropic else (1,)).expand(3)
        return _apply_linear(sample, torch.diag(k), to_normals=torch.diag(1.0 / k))


class RandomFlip:
    """Mirror each axis in ``axes`` (0 = x, 1 = y, 2 = z) independently with probability ``p``."""

    def __init__(self, p: float = 0.5, axes: Sequence[int] = (0, 1)) -> None:
        if not 0 <= p <= 1 or any(a not in (0, 1, 2) for a in axes):
            raise ConfigError(f"RandomFlip: expected 0 <= p <= 1 and axes in 0, 1, 2, got p={p}, axes={axes}")
        self.p, self.axes = p, list(axes)

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        flip = _uniform(generator, 0.0, 1.0, (3,)) < self.p
        mask = torch.zeros(3, dtype=torch.bool, device=flip.device)
        mask[self.axes] = True
        sign = torch.where(flip & mask, -1.0, 1.0).to(torch.float64)
        return _apply_linear(sample, torch.diag(sign))


class RandomJitter:
    """Add Gaussian noise of std ``sigma`` metres, clipped to ``[-clip, clip]``, to every coordinate."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        if sigma < 0 or clip <= 0:
            raise ConfigError(f"RandomJitter: expected sigma >= 0 and clip > 0, got sigma={sigma}, clip={clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        coord = _coord(sample)
        noise = torch.randn(coord.shape, generator=generator, device=generator.device, dtype=coord.dtype)
        out = dict(sample)
        out["coord"] = coord + (self.sigma * noise).clamp_(-self.clip, self.clip).to(coord.device)
        return out


# ------------------------------------------------------------------------------------------- volumes
def _volume(sample: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    image, affine = sample.get("image"), sample.get("affine")
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise DataFormatError("volume transform: 'image' must be a (C, D, H, W) tensor")
    if not isinstance(affine, torch.Tensor) or affine.shape != (4, 4):
        raise DataFormatError("volume transform: 'affine' must be a (4, 4) tensor")
    label = sample.get("label")
    if label is not None and (not isinstance(label, torch.Tensor) or label.ndim != 4 or label.shape[1:] != image.shape[1:]):
        raise DataFormatError("volume transform: 'label' must be a (1, D, H, W) tensor on the image grid")
    return image, affine


def _shifted(affine: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """Affine of a grid whose voxel 0 is the old grid's voxel ``shift`` (may be negative)."""
    t = torch.eye(4, dtype=affine.dtype, device=affine.device)
    t[:3, 3] = torch.tensor([float(s) for s in shift], dtype=affine.dtype, device=affine.device)
    return affine @ t


def _triple(value: Sequence[int] | int, name: str) -> list[int]:
    v = [int(value)] * 3 if isinstance(value, int) else [int(x) for x in value]
    if len(v) != 3:
        raise ConfigError(f"{name}: expected 3 integers (D, H, W), got {value!r}")
    return v


def crop_volume(sample: Mapping[str, Any], start: Sequence[int], size: Sequence[int]) -> Sample:
    """Keep voxels ``start[i] : start[i] + size[i]`` of ``image`` and ``label``; shift ``affine`` by ``start``.

    The crop must lie inside the volume (pad first to enlarge it).
    """
    image, affine = _volume(sample)
    start, size = _triple(start, "crop start"), _triple(size, "crop size")
    shape = list(image.shape[1:])
    if any(b < 0 or n < 1 or b + n > s for b, n, s in zip(start, size, shape)):
        raise DataFormatError(f"crop_volume: crop start {start} size {size} does not fit the volume {shape}")
    sl = (slice(None),) + tuple(slice(b, b + n) for b, n in zip(start, size))
    out = dict(sample)
    out["image"] = image[sl]
    if sample.get("label") is not None:
        out["label"] = sample["label"][sl]
    out["affine"] = _shifted(affine, start)
    return out


def _padded(x: torch.Tensor, before: list[int], after: list[int], value: float) -> torch.Tensor:
    # written without torch.nn.functional.pad: datasets does not import torch.nn
    shape = [x.shape[0]] + [s + b + a for s, b, a in zip(x.shape[1:], before, after)]
    out = x.new_full(shape, value)
    out[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, x.shape[1:]))] = x
    return out


def pad_volume(sample: Mapping[str, Any], before: Sequence[int], after: Sequence[int],
               image_value: float = 0.0, label_value: int = IGNORE_INDEX) -> Sample:
    """Pad ``image`` with ``image_value`` and ``label`` with ``label_value`` (default: ignore index -1).

    ``before``/``after`` are voxel counts per axis (D, H, W); ``affine`` is shifted by ``-before``.
    """
    image, affine = _volume(sample)
    before, after = _triple(before, "pad before"), _triple(after, "pad after")
    if any(v < 0 for v in before + after):
        raise DataFormatError(f"pad_volume: pad widths must be >= 0, got before={before}, after={after}")
    out = dict(sample)
    out["image"] = _padded(image, before, after, image_value)
    if sample.get("label") is not None:
        out["label"] = _padded(sample["label"], before, after, label_value)
    out["affine"] = _shifted(affine, [-b for b in before])
    return out


class SpatialPad:
    """Pad symmetrically up to at least ``size`` (D, H, W); the odd voxel goes after (as MONAI)."""

    def __init__(self, size: Sequence[int] | int, image_value: float = 0.0, label_value: int = IGNORE_INDEX) -> None:
        self.size, self.image_value, self.label_value = _triple(size, "SpatialPad size"), image_value, label_value

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator | None = None) -> Sample:
        image, _ = _volume(sample)
        width = [max(t - s, 0) for t, s in zip(self.size, image.shape[1:])]
        return pad_volume(sample, [w // 2 for w in width], [w - w // 2 for w in width], self.image_value, self.label_value)


class CenterCrop:
    """Crop ``size`` (D, H, W) about the centre voxel ``s // 2`` (as MONAI); axes already smaller are kept."""

    def __init__(self, size: Sequence[int] | int) -> None:
        self.size = _triple(size, "CenterCrop size")

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator | None = None) -> Sample:
        image, _ = _volume(sample)
        shape = list(image.shape[1:])
        size = [min(t, s) for t, s in zip(self.size, shape)]
        return crop_volume(sample, [s // 2 - n // 2 for s, n in zip(shape, size)], size)


class RandomCrop:
    """Crop ``size`` (D, H, W) at a start drawn uniformly from all positions that fit (pad first if needed)."""

    def __init__(self, size: Sequence[int] | int) -> None:
        self.size = _triple(size, "RandomCrop size")

    def __call__(self, sample: Mapping[str, Any], generator: torch.Generator) -> Sample:
        image, _ = _volume(sample)
        shape = list(image.shape[1:])
        if any(n > s for n, s in zip(self.size, shape)):
            raise DataFormatError(f"RandomCrop: size {self.size} exceeds the volume {shape}; apply SpatialPad first")
        start = [int(torch.randint(0, s - n + 1, (), generator=generator, device=generator.device))
                 for s, n in zip(shape, self.size)]
        return crop_volume(sample, start, self.size)
