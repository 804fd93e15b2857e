"""RAPiD-Seg network: VSA against a per-voxel loop, batch independence of the whole model in eval
mode, forward + backward on CPU for every variant, the frozen autoencoder, parameter counts, and a
CPU-vs-CUDA comparison of one forward pass (gpu marker)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("spconv")

from threefold.geometry.rapid.rapidseg import RAPiDSeg, SqueezeExcitation  # noqa: E402
from threefold.geometry.rapid.vsa import VoxelSetAttention  # noqa: E402

SMALL = dict(width=0.125, layers=(1, 1, 1, 1, 1, 1, 1, 1), latents=4, dim=16, inner_dim=4, stream_channels=8, voxel_size=0.5)


def _scan(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    coord = torch.rand(n, 3, generator=g) * torch.tensor([12.0, 12.0, 2.0]) - torch.tensor([6.0, 6.0, 1.0])
    return coord, torch.rand(n, generator=g), torch.rand(n, 10, generator=g)


def test_vsa_matches_per_voxel_loop_and_is_permutation_invariant():
    torch.manual_seed(0)
    vsa = VoxelSetAttention(5, latents=3, dim=8)
    x = torch.randn(70, 5, dtype=torch.float64)
    vsa = vsa.double()
    inv = torch.randint(0, 9, (70,))
    inv[:9] = torch.arange(9)  # every voxel occupied
    h = vsa(x, inv, 9)
    f = vsa.embed(x)
    s, v = vsa.score(f), vsa.value(f)
    for m in range(9):
        sel = inv == m
        a = torch.softmax(s[sel], 0)  # (n_m, l): softmax over the voxel's points, per latent
        torch.testing.assert_close(h[m], a.T @ v[sel])
    perm = torch.randperm(70)
    torch.testing.assert_close(vsa(x[perm], inv[perm], 9), h)


@pytest.mark.parametrize("dtype, n", [(torch.float16, 3000), (torch.bfloat16, 384)])
def test_scatter_ops_reduce_16bit_inputs_in_float32(dtype, n):
    """geometry/scatter.py on float16 / bfloat16 (linear outputs under autocast): the result keeps the
    input's dtype but the reduction runs in float32. A 16-bit running sum of n ones sticks at 2048
    (float16) or 256 (bfloat16); float32 accumulation gives n, representable in the 16-bit type."""
    from threefold.geometry.scatter import scatter_max, scatter_mean, scatter_softmax, scatter_sum

    index = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    ones = torch.ones(n + 5, dtype=dtype)
    total = scatter_sum(ones, index, 3)
    assert total.dtype == dtype and total.tolist() == [float(n), 5.0, 0.0]
    mean = scatter_mean(ones * 3, index, 3)
    assert mean.dtype == dtype and mean.tolist() == [3.0, 3.0, 0.0]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(n + 5, 2))).to(dtype)
    x64 = x.double().numpy()
    want_max = np.stack([x64[:n].max(0), x64[n:].max(0), [0.0, 0.0]])
    got_max = scatter_max(x, index, 3)
    assert got_max.dtype == dtype and np.array_equal(got_max.double().numpy(), want_max)  # exact
    soft = scatter_softmax(x, index, 3)
    first = np.arange(n + 5)[:, None] < n
    e = np.exp(x64 - np.where(first, want_max[0], want_max[1]))
    want = e / np.where(first, e[:n].sum(0), e[n:].sum(0))
    assert soft.dtype == dtype
    np.testing.assert_allclose(soft.double().numpy(), want, rtol=1e-2, atol=1e-6)  # one 16-bit rounding
    # the softmax sums to 1 per segment to float32 accuracy before the final rounding
    sums = scatter_sum(soft.float(), index, 3)[:2]
    np.testing.assert_allclose(sums.numpy(), 1.0, rtol=1e-2)


def test_vsa_under_autocast_keeps_attention_in_float32():
    """Under a 16-bit autocast (bfloat16 on CPU, float16 on CUDA) the VSA softmax and segment sums run
    in float32: the codes stay within the linear layers' 16-bit rounding of the float64 reference."""
    torch.manual_seed(0)
    vsa = VoxelSetAttention(5, latents=3, dim=8)
    x = torch.randn(4000, 5)
    inv = torch.randint(0, 4, (4000,))  # ~1000 points per voxel: a 16-bit running sum would drift
    ref = vsa.double()(x.double(), inv, 4)
    vsa = vsa.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vsa(x, inv, 4)
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


def test_squeeze_excitation_per_sample():
    se = SqueezeExcitation(16, 8)
    x = torch.randn(30, 16)
    b = torch.tensor([0] * 12 + [1] * 18)
    out = se(x, b, 2)
    for s in (0, 1):
        w = se.fc(x[b == s].mean(0, keepdim=True))
        torch.testing.assert_close(out[b == s], x[b == s] * w)


@pytest.mark.parametrize("variant", ["r", "c", "none"])
def test_forward_backward_cpu_every_parameter_learns(variant):
    torch.manual_seed(0)
    net = RAPiDSeg(variant=variant, **SMALL)
    coord, rem, rapid = _scan(600, 1)
    batch = (torch.arange(600) >= 250).long()
    logits = net(coord, rem, batch, rapid, rapid.flip(1) if variant == "c" else None)
    assert logits.shape == (600, 19)
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # the autoencoders' decoders only learn from the reconstruction loss (stage 1)
    assert all(".decoder." in n or "inner_ffn_dec" in n or "unsqueeze" in n for n in missing), missing
    net.eval()
    with torch.no_grad():  # eval mode (spconv's inference path) on CPU
        assert torch.isfinite(net(coord, rem, batch, rapid, rapid if variant == "c" else None)).all()


def test_batch_of_two_equals_each_scan_alone_in_eval():
    # One thread: spconv's CPU kernels split their sums by thread, so with several threads a scan's
    # activations round differently alone and in a batch (seen: 5e-4 on 2 threads), which would hide
    # nothing but break the 1e-5 comparison that catches a cross-sample leak.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _batch_of_two_equals_each_scan_alone()
    finally:
        torch.set_num_threads(threads)


def _batch_of_two_equals_each_scan_alone() -> None:
    torch.manual_seed(0)
    net = RAPiDSeg(variant="r", **SMALL).eval()
    a, b = _scan(300, 2), _scan(200, 3)
    with torch.no_grad():
        alone = [net(c, r, torch.zeros(len(c), dtype=torch.long), f) for c, r, f in (a, b)]
        coord = torch.cat([a[0], b[0] + 100.0])  # far apart: any cross-sample leak would show
        joint = net(coord, torch.cat([a[1], b[1]]), torch.cat([torch.zeros(300), torch.ones(200)]).long(),
                    torch.cat([a[2], b[2]]))
    # the second scan moved by 100 m: only the absolute-coordinate input of its coordinate stream differs
    torch.testing.assert_close(joint[:300], alone[0], atol=1e-5, rtol=1e-5)
    assert joint.shape == (500, 19)


def test_ae_loss_and_frozen_autoencoder():
    torch.manual_seed(0)
    net = RAPiDSeg(variant="r", **SMALL)
    coord, rem, rapid = _scan(400, 4)
    batch = torch.zeros(400, dtype=torch.long)
    grid = net.voxelize(coord, batch)
    labels = torch.randint(0, 3, (grid.num_voxels,))
    loss, z, parts = net.rapid_ae.loss(rapid, grid.offset, grid.inverse, grid.indices, grid.table, labels)
    assert z.shape == (grid.num_voxels, 4 * 4) and set(parts) == {"mse", "contrastive"}
    loss.backward()
    assert all(p.grad is not None for p in net.rapid_ae.parameters())
    net.zero_grad(set_to_none=True)
    net(coord, rem, batch, rapid, frozen_ae=True).sum().backward()
    assert all(p.grad is None for p in net.rapid_ae.parameters())
    assert net.head.weight.grad is not None


def test_full_width_parameter_counts():
    counts = {v: sum(p.numel() for p in RAPiDSeg(variant=v).parameters()) for v in ("none", "r", "c")}
    # MinkUNet34C is 37.85 M parameters; RAPiD streams + fusion add < 1 M (R) and < 1.5 M (R + C)
    assert 37.8e6 < counts["none"] < 37.9e6
    assert 0 < counts["r"] - counts["none"] < 1.0e6
    assert counts["r"] < counts["c"] < counts["none"] + 1.5e6


@pytest.mark.gpu
def test_cpu_and_cuda_forward_agree():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # full fp32 on both sides
    try:
        torch.manual_seed(0)
        net = RAPiDSeg(variant="r", width=0.5, voxel_size=0.2)
        g = torch.Generator().manual_seed(5)
        n = 20000
        coord = torch.rand(n, 3, generator=g) * torch.tensor([40.0, 40.0, 4.0]) - torch.tensor([20.0, 20.0, 2.0])
        rem, rapid = torch.rand(n, generator=g), torch.rand(n, 10, generator=g)
        batch = torch.zeros(n, dtype=torch.long)
        with torch.no_grad():
            for _ in range(3):  # BatchNorm running statistics of this input: activations of trained scale
                net(coord, rem, batch, rapid)
            net.eval()
            cpu = net(coord, rem, batch, rapid)  # spconv native algorithm
            net.cuda()
            gpu = net(coord.cuda(), rem.cuda(), batch.cuda(), rapid.cuda()).cpu()  # implicit GEMM
        err = (cpu - gpu).abs().max().item()
        assert err < 1e-4, err
        net.train()
        net(coord.cuda(), rem.cuda(), batch.cuda(), rapid.cuda()).logsumexp(1).sum().backward()  # CUDA backward
        assert np.isfinite(net.head.weight.grad.cpu().numpy()).all()
        assert all(p.grad is not None for p in net.backbone.parameters())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_predict_is_forward_in_inference_mode_and_checks_precision():
    from threefold.datasets.errors import ConfigError

    torch.manual_seed(0)
    net = RAPiDSeg(variant="c", **SMALL)
    coord, rem, rapid = _scan(500, 6)
    batch = torch.zeros(500, dtype=torch.long)
    with pytest.raises(ConfigError, match="eval"):
        net.predict(coord, rem, batch, rapid, rapid.flip(1))  # BatchNorm in training mode
    net.eval()
    with torch.no_grad():
        want = net(coord, rem, batch, rapid, rapid.flip(1))
    got = net.predict(coord, rem, batch, rapid, rapid.flip(1))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(ConfigError, match="CUDA"):
        net.predict(coord, rem, batch, rapid, rapid.flip(1), precision="fp16")  # spconv's CPU kernels are fp32
    with pytest.raises(ConfigError, match="precision"):
        net.predict(coord, rem, batch, rapid, rapid.flip(1), precision="bf16")
    # the stem switch acts under a float16 autocast only: fp32 inference is unchanged, a bad value is named
    from threefold.geometry.rapid import minkunet

    try:
        minkunet.STEM_UNDER_FP16 = "fp32"
        assert torch.equal(net.predict(coord, rem, batch, rapid, rapid.flip(1)), want)
        minkunet.STEM_UNDER_FP16 = "fp8"
        with pytest.raises(ConfigError, match="STEM_UNDER_FP16='fp8'"):
            net.predict(coord, rem, batch, rapid, rapid.flip(1))
    finally:
        minkunet.STEM_UNDER_FP16 = "fp16"


def _calibrated_full_width(n: int, seed: int, device: str):
    """Full-width R-RAPiD-Seg with BatchNorm statistics of its input (untrained weights) and a scan."""
    torch.manual_seed(0)
    net = RAPiDSeg(variant="r", voxel_size=0.1).to(device)
    g = torch.Generator().manual_seed(seed)
    coord = torch.rand(n, 3, generator=g) * torch.tensor([40.0, 40.0, 4.0]) - torch.tensor([20.0, 20.0, 2.0])
    rem, rapid = torch.rand(n, generator=g), torch.rand(n, 10, generator=g)
    args = [t.to(device) for t in (coord, rem, torch.zeros(n, dtype=torch.long), rapid)]
    with torch.no_grad():
        for _ in range(3):
            net(*args)
    return net.eval(), args


@pytest.mark.gpu
@pytest.mark.parametrize("stem", ["fp16", "fp16acc", "fp32"])
def test_fp16_inference_agrees_with_fp32(stem):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from threefold.geometry.rapid import minkunet

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        net, args = _calibrated_full_width(30000, 7, "cuda")
        ref = net.predict(*args)
        minkunet.STEM_UNDER_FP16 = stem
        half = net.predict(*args, precision="fp16")
    finally:
        minkunet.STEM_UNDER_FP16 = "fp16"
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # float16 carries ~3 significant digits through ~70 layers: logits within a few percent of their
    # spread, labels equal except where the top two logits nearly tie
    scale = ref.std().item()
    err = (half - ref).abs().max().item()
    agree = (half.argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"fp16 vs fp32: max |Δlogit| {err:.3g} (logit std {scale:.3g}), labels equal {agree:.4%}")
    assert err < 0.1 * scale and agree > 0.95


@pytest.mark.parametrize("kind", [pytest.param("cuda", marks=pytest.mark.gpu), "interpreter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_depthwise_triton_kernel_equals_torch_loop(dtype, kind):
    """The Triton depth-wise conv (geometry/rapid/depthwise_triton.py) against the float64 torch loop, on
    CUDA or in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if kind == "interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter runs with TRITON_INTERPRET=1")
    device = "cuda" if kind == "cuda" else "cpu"
    from threefold.geometry.rapid import sparse
    from threefold.geometry.rapid.depthwise_triton import depthwise_conv_triton

    g = torch.Generator().manual_seed(8)
    n, extent = (60000, 40) if kind == "cuda" else (3000, 12)
    ijk = torch.unique(torch.randint(0, extent, (n, 4), generator=g) * torch.tensor([0, 1, 1, 1])
                       + torch.tensor([1, 0, 0, 0]) * torch.randint(0, 2, (n, 1), generator=g), dim=0)
    for channels in (128, 40):  # a multiple of the channel block and not
        dw = sparse.DepthwiseSubMConv3d(channels).to(device)
        idx = ijk.int().to(device)
        table = dw.neighbour_table(idx, dw.offsets)
        x = torch.randn(len(idx), channels, generator=g).to(device, dtype)
        with torch.no_grad():
            got = depthwise_conv_triton(x, table, dw.weight)
            assert got.dtype == dtype
            # the module takes the kernel when no gradient is needed, the torch loop otherwise
            via_module = dw(x, idx, table)
            sparse.USE_TRITON = False
            try:
                loop = dw(x, idx, table)
            finally:
                sparse.USE_TRITON = True
        ref = dw.double().cpu()(x.double().cpu(), idx.cpu(), table.cpu()) - dw.bias.double().cpu()  # float64, CPU
        tol = 1e-5 if dtype == torch.float32 else 2e-3 * ref.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), ref, atol=tol, rtol=1e-3 if dtype == torch.float16 else 1e-5)
        torch.testing.assert_close(via_module.float(), loop.float(), atol=tol, rtol=1e-3)


@pytest.mark.parametrize("kind, kernel, stride, relu", [("subm", 3, 1, True), ("subm", 1, 1, False),
                                                        ("conv", 2, 2, True)])
def test_folded_batchnorm_equals_conv_bn_relu(kind, kernel, stride, relu):
    """The weights and bias of the BatchNorm folding used at inference on CUDA (minkunet.FUSE_BN_INFERENCE),
    applied here with spconv's CPU kernel plus the bias and ReLU that CUDA puts in its epilogue."""
    from threefold.geometry.rapid.minkunet import _ConvBNReLU
    from threefold.geometry.rapid.sparse import sparse_tensor, voxelize

    torch.manual_seed(0)
    layer = _ConvBNReLU(6, 8, kernel, stride, kind=kind, key=f"k{kind}{kernel}", relu=relu)
    with torch.no_grad():  # statistics and affine parameters away from the identity
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2.0)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
    layer.eval()
    coord = torch.rand(2000, 3) * 6
    idx, _ = voxelize(coord, torch.zeros(2000, dtype=torch.long), 0.3)
    feats = torch.randn(len(idx), 6)
    with torch.no_grad():
        want = layer(sparse_tensor(feats, idx, 1)).features  # CPU: conv, BN, ReLU
        weight, bias = layer.folded(torch.float32)
        c = layer.conv.conv
        got = c._conv_forward(False, sparse_tensor(feats, idx, 1), weight, None, name=c.name,
                              sparse_unique_name=c._sparse_unique_name).features + bias
    torch.testing.assert_close(got.relu() if relu else got, want, atol=1e-5, rtol=1e-5)
    assert layer.folded(torch.float16)[0].dtype == torch.float16
