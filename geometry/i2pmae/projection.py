"""Multi-view depth projection and image-to-point back-projection of I2P-MAE (Zhang et al., "Learning
3D Representations from 2D Pre-trained Models via Image-to-Point Masked Autoencoders", CVPR 2023, §3.2;
reference ``proj2img`` / ``I2P`` in ZrrSkywalker/I2P-MAE ``models/I2P_MAE.py``).

A cloud is rendered into three orthographic depth images, one per cyclic permutation of its axes
(:data:`VIEW_AXES`: xyz, zxy, yzx). In each view the first two permuted coordinates give the pixel
(first → row, second → column) and the third is the depth value:

* grid size = the larger of the two in-plane ranges / (224 − 3), so the cloud spans 222 pixels;
* each point is splatted onto the 5 × 5 pixels around its cell and the depths of all points landing on
  a pixel are summed (a torch scatter-add, no loop over points);
* the splat is centred in the 224 × 224 image and clamped to it, replicated to 3 channels, passed
  through a sigmoid (empty pixels become 0.5) and normalised with the ImageNet mean / std.

:func:`sample_view_map` reads a 2D map (a teacher's 14 × 14 features or attention) back at 3D points:
the map is upsampled bicubically to 224² and read at each point's pixel (its cell + 1 + the view's
centring offset, the reference's ``I2P``); the bicubic value is evaluated only at the pixels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from threefold.datasets.errors import DataFormatError

IMAGE_SIZE = 224
#: The three views: axis permutations (x, y, z), (z, x, y), (y, z, x).
VIEW_AXES = ((0, 1, 2), (2, 0, 1), (1, 2, 0))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLAT = 5  # each point covers SPLAT x SPLAT pixels


@dataclass
class ViewGeometry:
    """Where a view put the cloud: ``origin (B, 2)`` the in-plane minimum, ``grid (B,)`` the pixel size
    (the cloud's unit per pixel), ``offset (B, 2)`` int64 the centring shift in pixels."""

    origin: Tensor
    grid: Tensor
    offset: Tensor


def view_coordinates(points: Tensor, view: int) -> Tensor:
    """``points (B, N, 3)`` -> the same points with their axes permuted for ``view`` in {0, 1, 2}."""
    return points[..., list(VIEW_AXES[view])]


def _cells(plane: Tensor, origin: Tensor, grid: Tensor) -> Tensor:
    # floor((p - min) / grid): the pixel cell of each point before splatting and centring, (B, N, 2) int64
    return torch.floor((plane - origin.unsqueeze(1)) / grid.view(-1, 1, 1)).long()


def project_depth(points: Tensor, image_size: int = IMAGE_SIZE) -> tuple[Tensor, ViewGeometry]:
    """One orthographic depth view of already-permuted points.

    ``points (B, N, 3)`` float (first two coordinates → pixel, third → depth) -> ``image (B, 3, S, S)``
    float32 (sigmoid of the summed splatted depths, ImageNet-normalised) and the view's
    :class:`ViewGeometry`. The depth unit is the cloud's (unit sphere after normalisation).
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise DataFormatError(f"project_depth: points {tuple(points.shape)}, expected (B, N, 3)")
    pts = points.float()
    b, n, _ = pts.shape
    plane = pts[..., :2]
    lo = plane.amin(1)
    # Times the reciprocal, not divided by the scalar: CUDA computes a division by a Python scalar as a
    # multiplication, and a grid one bit apart moves edge points to another cell (and re-centres the view).
    grid = (plane.amax(1) - lo).amax(-1) * (1.0 / (image_size - 3))
    grid = grid.clamp_min(torch.finfo(grid.dtype).tiny)  # a single point: any grid puts it in cell 0
    cell = _cells(plane, lo, grid)  # (B, N, 2)
    r = SPLAT // 2
    d = torch.arange(-r, r + 1, device=pts.device)
    splat = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)  # (25, 2)
    dense = cell.unsqueeze(2) + splat + 1  # (B, N, 25, 2)
    flat = dense.reshape(b, -1, 2)
    # Centre the splatted footprint: its midpoint goes to pixel image_size / 2 - 1.
    mid = torch.div(flat.amax(1) + flat.amin(1), 2, rounding_mode="floor")
    offset = image_size // 2 - mid - 1  # (B, 2)
    pix = (flat + offset.unsqueeze(1)).clamp(0, image_size - 1)
    index = pix[..., 0] * image_size + pix[..., 1]  # (B, 25N)
    depth = pts[..., 2:3].expand(b, n, splat.shape[0]).reshape(b, -1)
    img = depth.new_zeros(b, image_size * image_size).scatter_add_(1, index, depth)
    img = torch.sigmoid(img.view(b, 1, image_size, image_size)).expand(b, 3, image_size, image_size)
    mean = torch.tensor(IMAGENET_MEAN, device=pts.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pts.device).view(1, 3, 1, 1)
    return (img - mean) / std, ViewGeometry(lo, grid, offset)


def project_views(points: Tensor, image_size: int = IMAGE_SIZE) -> tuple[Tensor, list[ViewGeometry]]:
    """The three depth views of I2P-MAE. ``points (B, N, 3)`` -> ``images (3, B, 3, S, S)`` float32
    (view-major) and one :class:`ViewGeometry` per view."""
    images, geoms = [], []
    for v in range(len(VIEW_AXES)):
        img, geom = project_depth(view_coordinates(points, v), image_size)
        images.append(img)
        geoms.append(geom)
    return torch.stack(images), geoms


def view_pixels(points: Tensor, geom: ViewGeometry, image_size: int = IMAGE_SIZE) -> Tensor:
    """Pixel index (row · S + column) of already-permuted ``points (B, P, 3)`` in a view: their cell + 1
    + the view's offset, clamped to the image. -> ``(B, P)`` int64."""
    pix = _cells(points[..., :2].float(), geom.origin, geom.grid) + 1 + geom.offset.unsqueeze(1)
    pix = pix.clamp(0, image_size - 1)
    return pix[..., 0] * image_size + pix[..., 1]


def sample_view_map(feature_map: Tensor, points: Tensor, geom: ViewGeometry, image_size: int = IMAGE_SIZE) -> Tensor:
    """Back-project a 2D map to 3D points (the reference's ``I2P``): the value at the pixel of each of
    the already-permuted ``points (B, P, 3)`` of ``feature_map (B, C, h, w)`` upsampled bicubically
    (``align_corners=False``) to ``S × S`` -> ``(B, P, C)`` in the map's dtype."""
    idx = view_pixels(points, geom, image_size)
    row, col = torch.div(idx, image_size, rounding_mode="floor"), idx % image_size
    # Bicubic upsampling (align_corners=False) evaluates the cubic convolution at source coordinate
    # (i + 0.5) · h / S - 0.5 for output pixel i, with replicated borders; grid_sample with
    # padding_mode="border" evaluates the same kernel at normalised (2i + 1) / S - 1 only where it is
    # read, instead of materialising (B, C, 224, 224) — 6.6 GB per view at the reference's batch 64, C 512.
    dtype = torch.promote_types(feature_map.dtype, torch.float32)  # a bf16 grid would miss the pixel
    grid = torch.stack([(2 * col + 1).to(dtype) / image_size - 1, (2 * row + 1).to(dtype) / image_size - 1], -1)
    out = F.grid_sample(feature_map.to(dtype), grid.unsqueeze(2), mode="bicubic", padding_mode="border",
                        align_corners=False)  # grid (B, P, 1, 2): x = column, y = row
    return out[..., 0].transpose(1, 2).to(feature_map.dtype)
