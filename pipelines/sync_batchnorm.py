"""Synchronised BatchNorm for any device: one differentiable all-reduce per layer, no host sync.

``torch.nn.SyncBatchNorm`` runs on CUDA tensors only, so DDP runs on CPU processes (gloo) could not
synchronise their batch statistics. :class:`AllReduceSyncBatchNorm` does the same job with plain
tensor operations and :func:`torch.distributed.nn.functional.all_reduce`, whose backward is again a
sum all-reduce, so autograd carries the cross-process terms of the gradient. It reads no value of a
device tensor on the host (empty ranks included), so it does not stall a GPU stream either. On GPUs
the engine uses PyTorch's implementation unless ``trainer.sync_batchnorm_impl=allreduce``: on two H100s
this one was the slower of the two (docs/scaling.md), its unfused operations costing more than the host
syncs it avoids.

:func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm` swap the layers of a model in place
of ``BatchNorm1d/2d/3d`` and back, sharing the parameter and buffer tensors, and
:class:`AllReduceBatchNormSync` hands both to Lightning as a ``LayerSync`` plugin.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

_PLAIN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _world_size(group: Any) -> int:
    """Processes in ``group`` (1 outside an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce_sum(stats: Tensor, group: Any) -> Tensor:
    """Differentiable sum over the processes of ``group`` (the backward is a sum all-reduce too)."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of the functional collectives; it is the
        # documented autograd-aware all-reduce, and the warning would repeat in every run's log
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(stats, op=dist.ReduceOp.SUM, group=dist.group.WORLD if group is None else group)


def _stats_dtype(input: Tensor) -> torch.dtype:
    """float32, or the input's dtype when wider (float64)."""
    return torch.promote_types(input.dtype, torch.float32)


class AllReduceSyncBatchNorm(_BatchNorm):
    """BatchNorm over the union of every process's batch, on any device (CPU/gloo included).

    Input ``N x C x *`` (``*``: zero or more spatial dimensions), output of the same shape and dtype.
    In training mode with several processes, each process computes per channel its element count
    ``n`` (``N x prod(*)``, the same for all channels), ``sum(x - K)`` and ``sum((x - K)^2)`` in
    float32 or wider (float32 for half / bfloat16 inputs and under autocast, float64 stays); the ``2C + 1`` values ``[n, sum, sumsq]`` are summed over the
    processes with one all-reduce; the global mean and biased variance normalise the input, and the
    running variance is updated with the unbiased one (``n / (n - 1)``) and ``momentum`` as in
    ``torch.nn.BatchNorm*`` (``momentum=None``: cumulative average). The backward costs one more
    all-reduce of ``2C + 1`` values (the gradient of the statistics).

    Shift ``K``: the running mean when running statistics are tracked, else zero. It
    keeps ``sum((x - K)^2) / n - (sum(x - K) / n)^2`` from cancelling when ``|mean| >> std`` once
    the running mean has caught up, without a second all-reduce for a two-pass mean. It must be the
    same on every process, which holds: DDP broadcasts the buffers from rank 0 and every process
    updates them with the same all-reduced statistics.

    A process with an empty batch contributes zeros. Fewer than 2 elements per channel over all
    processes raise ``ValueError`` on CPU, as plain BatchNorm does; on a GPU that check would be a
    host sync, so there the counts are clamped against a division by zero and the result is meaningless.

    Eval mode, one process, or no initialised process group: exactly ``torch.nn.BatchNorm*``.
    ``process_group``: the group to synchronise over (``None``: the world).
    """

    # the BatchNorm class :func:`convert_sync_batchnorm` replaced; None for a layer built directly
    _plain_class: type[_BatchNorm] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an N x C x ... input (at least 2D), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or _world_size(self.process_group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        mean, var, count = self._global_stats(input)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return self._normalise(input, mean, var)

    def _global_stats(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Global per-channel mean and biased variance (float32) and the global element count."""
        x = input.to(_stats_dtype(input))
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shift = self._shift(x)
        centred = x - shift.view(1, c, *([1] * (x.dim() - 2)))
        # a Python int from the shape: no device value is read; an empty batch gives zero sums
        local_n = x.new_full((1,), float(x.shape[0] * math.prod(x.shape[2:])))
        stats = torch.cat([local_n, centred.sum(dims), centred.square().sum(dims)])
        total = _all_reduce_sum(stats, self.process_group)
        count = total[0]
        if total.device.type == "cpu" and float(count) < 2:
            # reading the count is free on the host (no stream to stall), so CPU runs get plain
            # BatchNorm's error instead of statistics of a single value
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel over all processes when training, "
                f"got {int(count)} (input {tuple(input.shape)} on this process)"
            )
        n = count.clamp(min=1.0)
        mean_shifted = total[1 : 1 + c] / n
        var = (total[1 + c :] / n - mean_shifted.square()).clamp(min=0.0)
        return shift + mean_shifted, var, count

    def _shift(self, x: Tensor) -> Tensor:
        if self.running_mean is not None:
            return self.running_mean.to(x.dtype)  # a buffer: no gradient flows into the shift
        return x.new_zeros(x.shape[1])

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # a tensor factor for momentum=None: 1 / num_batches_tracked without reading it on the host
        factor = 1.0 / self.num_batches_tracked.float() if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1.0).clamp(min=1.0))
        self.running_mean.mul_(1.0 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1.0 - factor).add_(factor * unbiased.to(self.running_var.dtype))

    def _normalise(self, input: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        offset = -mean * scale
        if self.bias is not None:
            offset = offset + self.bias.to(scale.dtype)
        shape = (1, input.shape[1], *([1] * (input.dim() - 2)))
        return (input.to(scale.dtype) * scale.view(shape) + offset.view(shape)).to(input.dtype)


def _swap(module: _BatchNorm, target: type[_BatchNorm], **extra: Any) -> _BatchNorm:
    """A ``target`` layer sharing ``module``'s parameters and buffers (so optimisers, devices, dtypes
    and ``requires_grad`` carry over) with its hyper-parameters and train/eval mode."""
    new = target(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **extra)
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """``module`` with every ``BatchNorm1d/2d/3d`` replaced by :class:`AllReduceSyncBatchNorm`
    (the root too: use the return value). The original class is remembered for the revert."""
    out = module
    if isinstance(module, _PLAIN):
        out = _swap(module, AllReduceSyncBatchNorm, process_group=process_group)
        out._plain_class = type(module)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert_sync_batchnorm`: the original ``BatchNorm1d/2d/3d`` layers, same tensors
    (so the state dict keys and values are those of the unconverted model). Layers built directly as
    :class:`AllReduceSyncBatchNorm` stay: without a process group they are plain BatchNorm anyway."""
    out = module
    if isinstance(module, AllReduceSyncBatchNorm) and module._plain_class is not None:
        out = _swap(module, module._plain_class)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out


class AllReduceBatchNormSync(LayerSync):
    """Lightning ``LayerSync`` plugin: the DDP strategy calls :meth:`apply` before wrapping the model
    for a fit and :meth:`revert` at teardown."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        return revert_sync_batchnorm(model)
