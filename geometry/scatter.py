"""Segment reductions over an index (``out[index[i]] ⊕= src[i]``) on torch's native scatter ops.

These are the reductions that voxel set attention, neighbour means and pooling over ragged batches need.
The default path is torch's own ``scatter_reduce`` / ``index_add_`` (no extra package, CPU and CUDA).
`torch-scatter <https://github.com/rusty1s/pytorch_scatter>`_ is an optional accelerator: with
``THREEFOLD_SCATTER=torch_scatter`` (or ``auto``) and the package installed, the same functions run
through it; both paths give the same numbers (tests/geometry/test_scatter.py checks this where
torch-scatter is installed).

Shapes: ``src (N, *F)``, ``index (N,)`` int64 with values in ``[0, dim_size)``; results ``(dim_size, *F)``.
Empty segments give 0 (sum, mean, max) — never ``-inf`` — so downstream code needs no special case.

Half-precision inputs (float16 / bfloat16, e.g. linear-layer outputs under ``torch.autocast``) are
reduced in float32 and the result cast back to the input's dtype: CUDA's 16-bit atomics
(``index_add_`` / ``scatter_reduce`` on 2-byte elements) are compare-and-swap loops on 32-bit words,
far slower than float32 atomics, and a float16 running sum over a segment loses precision.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def _backend():
    choice = os.environ.get("THREEFOLD_SCATTER", "torch")
    if choice not in ("torch", "torch_scatter", "auto"):
        from threefold.datasets.errors import ConfigError

        raise ConfigError(f"THREEFOLD_SCATTER={choice!r}: expected torch, torch_scatter or auto")
    if choice == "torch":
        return None
    try:
        import torch_scatter

        return torch_scatter
    except ImportError:
        if choice == "torch_scatter":
            from threefold.datasets.errors import MissingExtraError

            raise MissingExtraError("THREEFOLD_SCATTER=torch_scatter but torch-scatter is not installed; "
                                    "pip install 'threefold[scatter]' (a source build) or unset the variable")
        return None


_LOW = (torch.float16, torch.bfloat16)


def _expand(index: Tensor, src: Tensor) -> Tensor:
    if index.ndim != 1 or index.shape[0] != src.shape[0]:
        raise ValueError(f"index must be (N,) with N = src.shape[0] = {src.shape[0]}, got {tuple(index.shape)}")
    return index.view(-1, *([1] * (src.ndim - 1))).expand_as(src)


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    if src.dtype in _LOW:
        return scatter_sum(src.float(), index, dim_size).to(src.dtype)
    ts = _backend()
    if ts is not None:
        return ts.scatter_sum(src, index, dim=0, dim_size=dim_size)
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add_(0, index, src)


def scatter_count(index: Tensor, dim_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Number of elements in each segment, ``(dim_size,)``."""
    return torch.zeros(dim_size, dtype=dtype, device=index.device).index_add_(
        0, index, torch.ones_like(index, dtype=dtype))


def scatter_mean(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    if src.dtype in _LOW:
        return scatter_mean(src.float(), index, dim_size).to(src.dtype)
    ts = _backend()
    if ts is not None:
        return ts.scatter_mean(src, index, dim=0, dim_size=dim_size)
    count = scatter_count(index, dim_size, src.dtype).clamp_min(1)
    return scatter_sum(src, index, dim_size) / count.view(-1, *([1] * (src.ndim - 1)))


def scatter_max(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Segment maxima (values only); empty segments are 0."""
    if src.dtype in _LOW:  # exact: the maximum of 16-bit values is one of them
        return scatter_max(src.float(), index, dim_size).to(src.dtype)
    ts = _backend()
    if ts is not None:
        return ts.scatter_max(src, index, dim=0, dim_size=dim_size)[0]
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.scatter_reduce(0, _expand(index, src), src, reduce="amax", include_self=False)


def scatter_softmax(src: Tensor, index: Tensor, dim_size: int | None = None) -> Tensor:
    """Softmax of ``src`` within each segment (numerically stable: the segment max is subtracted)."""
    dim_size = int(index.max()) + 1 if dim_size is None else dim_size
    if src.dtype in _LOW:
        return scatter_softmax(src.float(), index, dim_size).to(src.dtype)
    ts = _backend()
    if ts is not None:
        from torch_scatter.composite import scatter_softmax as ts_softmax

        return ts_softmax(src, index, dim=0, dim_size=dim_size)
    shifted = src - scatter_max(src, index, dim_size).detach().index_select(0, index)
    e = shifted.exp()
    return e / scatter_sum(e, index, dim_size).index_select(0, index)
