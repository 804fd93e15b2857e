"""spconv (Yan et al., "SECOND", Sensors 2018; spconv 2.x) for RAPiD-Seg, on CPU and CUDA alike.

spconv 2.3 targets CUDA; its CPU paths (the ``spconv`` CPU wheel, or CPU tensors under the CUDA
build) break in three places, all handled here so that users never patch anything:

1. **Backward without CUDA.** ``spconv.pytorch.ops.indice_conv_backward`` calls
   ``get_current_stream()`` (= ``torch.cuda.current_stream().cuda_stream``) unconditionally, before
   branching on the device; the CPU branch never uses the stream, but on a torch without CUDA the
   call raises "Torch not compiled with CUDA enabled". :func:`require_spconv` replaces the name
   ``get_current_stream`` in ``spconv.pytorch.ops`` by a function that returns stream 0 when CUDA
   is unavailable and calls the original otherwise — it changes behaviour only where the original
   would raise, and no CUDA tensor can exist there.
2. **Bias in eval mode.** In eval mode spconv passes the bias into the fused kernel
   (``bias_for_infer``), and the CPU kernel asserts "cpu don't support act and bias". Every conv
   of :class:`SparseConv3d` is built without bias and adds its own ``bias`` parameter to the
   output features (the same sum the training path of spconv performs).
3. **Algorithm per device.** The CUDA build defaults to implicit GEMM, which has no CPU kernel;
   the CPU build only has the native gather-GEMM-scatter. Weights are stored KRSC by both
   (``ALL_WEIGHT_IS_KRSC``), so :class:`SparseConv3d` picks the algorithm from the device of the
   input features at each call: one checkpoint runs on either device with the same math.
4. **Multi-threaded CPU kernels race.** With more than one torch thread, spconv 2.3.8's CPU ops
   return different — wrong — features from call to call (a 3³ submanifold conv of 1,500 voxels:
   up to 0.5 apart between identical calls at 2 threads; the single-threaded result equals a
   brute-force sum). :func:`require_spconv` wraps every function of ``spconv.pytorch.ops`` (indice
   generation, gather-GEMM-scatter forward and backward, pooling) so that a call whose tensors are
   all on the CPU runs with one torch thread, the caller's thread count restored afterwards; CUDA
   calls are untouched.

And one for half-precision inference on CUDA: spconv's autocast hook (``custom_fwd(cast_inputs=
float16)``) sits on its training autograd Functions only; in eval mode it calls its kernels directly,
so under ``torch.autocast`` the convs would stay float32 (spconv's float32 kernels are SIMT: it never
enables TF32) or meet float16 features with float32 weights. Under a float16 CUDA autocast in eval mode,
:class:`SparseConv3d` casts the features and (a cached copy of) the weights to float16 itself; the
kernels accumulate in float32 where spconv's heuristic asks for it (reductions over > 128·27 terms),
or everywhere with :data:`FP16_FP32_ACCUM` = True.

Voxel helpers (:func:`voxelize`) are torch-native (``torch.unique``) and run on the input's device.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError, require

_SHIM_FLAG = "_threefold_cpu_stream_shim"


def require_spconv() -> Any:
    """``spconv.pytorch`` with the CPU-backward fix and the single-threaded CPU ops installed (module
    docstring, items 1 and 4; idempotent).

    Raises :class:`~threefold.datasets.errors.MissingExtraError` naming the ``cpu`` extra (``cu126`` etc. for the CUDA builds) when
    spconv is not installed.
    """
    spconv = require("spconv.pytorch", "cpu")  # or cu126 / cu124 / cu121: one spconv build
    ops = __import__("spconv.pytorch.ops", fromlist=["ops"])
    original = ops.get_current_stream
    if not getattr(original, _SHIM_FLAG, False):

        def get_current_stream() -> int:
            # spconv's CPU backward asks for a CUDA stream it then ignores; without CUDA there is none
            if not torch.cuda.is_available():
                return 0
            return original()

        setattr(get_current_stream, _SHIM_FLAG, True)
        ops.get_current_stream = get_current_stream
    for name, fn in list(vars(ops).items()):
        if inspect.isfunction(fn) and fn.__module__ == ops.__name__ and not getattr(fn, _SHIM_FLAG, False):
            setattr(ops, name, _single_threaded_on_cpu(fn))
    return spconv


def _single_threaded_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with one torch thread when none of its tensor arguments is on CUDA (item 4)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, Tensor) and a.is_cuda for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    setattr(call, _SHIM_FLAG, True)
    return call


def _algo_for(features: Tensor, cuda_algo: Any) -> Any:
    from spconv.core import ConvAlgo

    return cuda_algo if features.is_cuda else ConvAlgo.Native


class SparseConv3d(nn.Module):
    """A 3D sparse convolution that trains and evaluates on CPU and CUDA.

    Args:
        in_channels, out_channels: feature widths C_in → C_out.
        kernel_size, stride: as in spconv.
        kind: ``"subm"`` (submanifold: output sites = input sites), ``"conv"`` (strided, new sites)
            or ``"inverse"`` (transposed conv back onto the sites of the ``"conv"`` with the same
            ``indice_key``).
        indice_key: spconv's key for sharing neighbour maps between layers of one resolution.
        bias: a learned per-channel offset added after the conv (see the module docstring, item 2).

    Input/output: ``spconv.SparseConvTensor`` with ``features (M, C) float32``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 kind: str = "subm", indice_key: str | None = None, bias: bool = False) -> None:
        super().__init__()
        spconv = require_spconv()
        if kind == "subm":
            self.conv = spconv.SubMConv3d(in_channels, out_channels, kernel_size, stride, bias=False, indice_key=indice_key)
        elif kind == "conv":
            self.conv = spconv.SparseConv3d(in_channels, out_channels, kernel_size, stride, bias=False, indice_key=indice_key)
        elif kind == "inverse":
            if indice_key is None:
                raise ConfigError("SparseConv3d(kind='inverse') needs the indice_key of its strided conv")
            self.conv = spconv.SparseInverseConv3d(in_channels, out_channels, kernel_size, bias=False, indice_key=indice_key)
        else:
            raise ConfigError(f"SparseConv3d kind={kind!r}: expected subm, conv or inverse")
        self._cuda_algo = self.conv.algo  # the build's default; used for CUDA inputs only
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._half: tuple[tuple[int, int], Tensor] | None = None  # (weight storage, version) → float16 copy

    def forward(self, x: Any) -> Any:
        # per call, from the data's device: the modules of one forward all agree, as spconv's shared
        # indice_key maps require
        self.conv.algo = _algo_for(x.features, self._cuda_algo)
        if not self.training and x.features.is_cuda and _autocast_fp16():
            c = self.conv  # spconv's own forward, with float16 features and weights (module docstring)
            c.fp32_accum = FP16_FP32_ACCUM
            out = c._conv_forward(False, x.replace_feature(x.features.half()), self._half_weight(), None,
                                  name=c.name, sparse_unique_name=c._sparse_unique_name, act_type=c.act_type,
                                  act_alpha=c.act_alpha, act_beta=c.act_beta)
        else:
            out = self.conv(x)
        if self.bias is not None:
            out = out.replace_feature(out.features + self.bias)
        return out

    def forward_with(self, x: Any, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Any:
        """Eval-mode CUDA conv with the given ``weight`` (KRSC, the conv's shape) and ``bias``, and a
        ReLU, all inside spconv's implicit-GEMM epilogue: how :class:`~threefold.geometry.rapid.minkunet`
        runs a conv + BatchNorm + ReLU folded into one kernel at inference. The features are cast to
        the weight's dtype. CUDA only: spconv's CPU kernels take neither bias nor activation (item 2)."""
        from cumm import tensorview as tv

        c = self.conv
        c.algo = self._cuda_algo
        if weight.dtype == torch.float16 and FP16_FP32_ACCUM is not None:  # else the caller's / spconv's choice
            c.fp32_accum = FP16_FP32_ACCUM
        if c.conv1x1:  # spconv runs 1×1 convs as a plain matmul, without fused activation
            act, relu_after = tv.gemm.Activation.None_, relu
        else:
            act, relu_after = (tv.gemm.Activation.ReLU if relu else tv.gemm.Activation.None_), False
        out = c._conv_forward(False, x.replace_feature(x.features.to(weight.dtype)), weight, bias, name=c.name,
                              sparse_unique_name=c._sparse_unique_name, act_type=act, act_alpha=0.0, act_beta=0.0)
        return out.replace_feature(out.features.relu_()) if relu_after else out

    def _half_weight(self) -> Tensor:
        """float16 copy of the conv weight, made again only when the weight changes (an optimiser
        step bumps its version, ``.to()`` moves its storage)."""
        w = self.conv.weight
        key = (w.data_ptr(), w._version)
        if self._half is None or self._half[0] != key:
            self._half = (key, w.detach().half())
        return self._half[1]


#: Accumulation of float16 sparse convs: None leaves spconv's heuristic (float32 for reductions over more
#: than 128·27 terms, else float16); True forces float32 (benchmarks/rapidseg.py --fp32-accum compares).
FP16_FP32_ACCUM: bool | None = None


def _autocast_fp16() -> bool:
    return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16


def voxelize(coord: Tensor, batch: Tensor, voxel_size: float) -> tuple[Tensor, Tensor]:
    """Quantise points to voxels.

    Args:
        coord: ``(N, 3)`` float32 metres.
        batch: ``(N,)`` int64 sample index of each point (0 … B-1).
        voxel_size: edge length in metres.

    Returns:
        ``indices (M, 4)`` int32 ``[batch, i, j, k]`` with non-negative grid coordinates (each sample
        shifted by its own minimum, so the grid is translation-invariant up to the voxel phase),
        sorted lexicographically; ``inverse (N,)`` int64, the voxel of each point.
    """
    if coord.ndim != 2 or coord.shape[1] != 3 or batch.shape != coord.shape[:1]:
        raise DataFormatError(f"voxelize: expected coord (N, 3) and batch (N,), got {tuple(coord.shape)}, {tuple(batch.shape)}")
    if voxel_size <= 0:
        raise ConfigError(f"voxelize: voxel_size={voxel_size} must be > 0 metres")
    # Multiply by the reciprocal: CUDA divides by a Python scalar that way, and CPU and CUDA must put
    # every point in the same voxel (a true division on the CPU differs in the last bit at cell edges).
    grid = torch.floor(coord * (1.0 / voxel_size)).long()
    n_batch = int(batch.max()) + 1 if batch.numel() else 0
    lo = torch.full((n_batch, 3), torch.iinfo(torch.int64).max, dtype=torch.long, device=coord.device)
    lo = lo.scatter_reduce(0, batch[:, None].expand(-1, 3), grid, reduce="amin")
    grid = grid - lo[batch]
    # one int64 key per point, monotone in (b, i, j, k): a 1-D unique is ~10x faster than unique(dim=0)
    span = grid.max(0).values + 1 if grid.numel() else torch.ones(3, dtype=torch.long, device=coord.device)
    keys = ((batch * span[0] + grid[:, 0]) * span[1] + grid[:, 1]) * span[2] + grid[:, 2]
    ukeys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    k = ukeys % span[2]
    rest = ukeys // span[2]
    j = rest % span[1]
    rest = rest // span[1]
    indices = torch.stack([rest // span[0], rest % span[0], j, k], 1)
    return indices.int(), inverse


def sparse_tensor(features: Tensor, indices: Tensor, batch_size: int) -> Any:
    """``spconv.SparseConvTensor`` over the grid spanned by ``indices (M, 4)`` int32 (see :func:`voxelize`)."""
    spconv = require_spconv()
    # +1 for the extent, then to a multiple of 16 so that four stride-2 levels stay aligned
    extent = (indices[:, 1:].max(0).values + 1).tolist() if indices.numel() else [1, 1, 1]
    shape = [int(-(-e // 16) * 16) for e in extent]
    return spconv.SparseConvTensor(features, indices, shape, batch_size)


class DepthwiseSubMConv3d(nn.Module):
    """Depth-wise submanifold 3×3×3 convolution (spconv has no ``groups``), torch-native.

    ``out[v, c] = Σ_δ w[δ, c] · x[v + δ, c] (+ b[c])`` over the occupied neighbours ``v + δ`` of the
    same sample; the neighbour of each offset is found by binary search over the sorted voxel keys.

    Input: ``features (M, C)`` float32, ``indices (M, 4)`` int32 from :func:`voxelize` (sorted).
    Output: ``(M, C)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        r = kernel_size // 2
        offsets = torch.stack(torch.meshgrid(*[torch.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = nn.Parameter(torch.randn(offsets.shape[0], channels) / offsets.shape[0] ** 0.5)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    @staticmethod
    def neighbour_table(indices: Tensor, offsets: Tensor) -> Tensor:
        """``(K, M)`` int64: row δ holds the index of voxel ``v + δ`` or -1 where it is empty."""
        idx = indices.long()
        span = idx[:, 1:].max(0).values + 3  # +1 extent, +2 room for the ±1 offsets
        def key(b: Tensor, ijk: Tensor) -> Tensor:
            ijk = ijk + 1
            return ((b * span[0] + ijk[..., 0]) * span[1] + ijk[..., 1]) * span[2] + ijk[..., 2]

        keys = key(idx[:, 0], idx[:, 1:])
        order = torch.argsort(keys)
        sorted_keys = keys[order]
        query = key(idx[None, :, 0], idx[None, :, 1:] + offsets[:, None].to(idx.device))  # (K, M)
        pos = torch.searchsorted(sorted_keys, query).clamp_max(keys.numel() - 1)
        hit = sorted_keys[pos] == query
        return torch.where(hit, order[pos], torch.full_like(pos, -1))

    def forward(self, features: Tensor, indices: Tensor, table: Tensor | None = None) -> Tensor:
        if table is None:
            table = self.neighbour_table(indices, self.offsets)
        needs_grad = torch.is_grad_enabled() and (features.requires_grad or self.weight.requires_grad)
        triton_conv = _depthwise_triton() if features.is_cuda and not needs_grad and USE_TRITON else None
        if triton_conv is not None:
            # one kernel instead of 27 materialised gathers (geometry/rapid/depthwise_triton.py)
            try:
                out = triton_conv(features, table, self.weight)
                return out + self.bias if self.bias is not None else out
            except Exception as err:  # a Triton that cannot compile here: the torch loop, said once
                _disable_triton(err)
        out = torch.zeros_like(features, dtype=torch.promote_types(features.dtype, self.weight.dtype))
        padded = torch.cat([features, features.new_zeros(1, features.shape[1])], 0)  # row -1 = empty neighbour
        for k in range(table.shape[0]):  # 27 offsets, each a vectorised gather over all voxels
            # in place: the running sum is not needed by autograd (addcmul saves only its inputs)
            out.addcmul_(padded[table[k]], self.weight[k])
        return out + self.bias if self.bias is not None else out


#: Run :class:`DepthwiseSubMConv3d` through the Triton kernel for CUDA inputs that need no gradient.
USE_TRITON = True


def _disable_triton(err: Exception) -> None:
    global USE_TRITON
    USE_TRITON = False
    import warnings

    warnings.warn(f"DepthwiseSubMConv3d: the Triton kernel failed ({type(err).__name__}: {err}); using the torch loop",
                  RuntimeWarning, stacklevel=3)


def _depthwise_triton() -> Any:
    try:
        from threefold.geometry.rapid.depthwise_triton import depthwise_conv_triton
    except ImportError:  # no Triton (CPU-only torch): the torch loop
        return None
    return depthwise_conv_triton
