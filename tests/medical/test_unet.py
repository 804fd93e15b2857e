"""Isensee 2017 residual U-Net: architecture facts from the paper checked by value (filter counts,
residual context modules, deep-supervision summation), and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from threefold.datasets.errors import ConfigError
from threefold.medical.segmentation import Isensee2017UNet, MultiLevelHead


def test_paper_configuration_filters_and_modules():
    net = Isensee2017UNet()  # 4 modalities, 16 base filters, 5 levels
    assert [c.out_channels for c in net.down] == [16, 32, 64, 128, 256]
    assert [c.stride for c in net.down] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout3d)]
    assert drops == [0.3] * 5  # one dropout per context module
    assert all(isinstance(m, torch.nn.LeakyReLU) for m in net.modules() if isinstance(m, torch.nn.ReLU | torch.nn.LeakyReLU))
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    # localization modules: 3³ conv keeping 2F filters then 1³ conv to F
    loc = net.localization[0]
    assert (loc[0][0].kernel_size, loc[0][0].out_channels) == ((3, 3, 3), 256)
    assert (loc[1][0].kernel_size, loc[1][0].out_channels) == ((1, 1, 1), 128)


def test_context_module_is_residual():
    net = Isensee2017UNet(base_filters=4, levels=3).eval()
    ctx = net.context[1]
    torch.nn.init.zeros_(ctx.body[-1].weight)
    torch.nn.init.zeros_(ctx.body[-1].bias)
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(ctx(x), x)


def test_output_is_sum_of_three_finest_segmentation_layers():
    torch.manual_seed(0)
    net = Isensee2017UNet(in_channels=4, out_channels=3, base_filters=4, levels=4).eval()
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in net.seg]
    x = torch.randn(1, 4, 16, 16, 16)
    out = net(x)
    for h in hooks:
        h.remove()
    coarse, mid, fine = captured
    assert [c.shape[-1] for c in captured] == [4, 8, 16]
    expected = fine + F.interpolate(mid + F.interpolate(coarse, scale_factor=2), scale_factor=2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("levels", [3, 4])
def test_every_parameter_is_used(levels):
    """With 3 levels the third is the bottleneck (no localization output): only two segmentation layers
    exist, so no parameter goes without a gradient (DDP refuses unused parameters)."""
    torch.manual_seed(0)
    net = Isensee2017UNet(in_channels=2, out_channels=3, base_filters=4, levels=levels)
    net(torch.randn(1, 2, 16, 16, 16)).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert len(net.seg) == min(3, levels - 1)


def test_shape_error_names_divisibility():
    with pytest.raises(ConfigError, match="divisible by 16"):
        Isensee2017UNet(levels=5)(torch.zeros(1, 4, 24, 32, 32))
    with pytest.raises(ConfigError, match="levels"):
        Isensee2017UNet(levels=2)


def test_learns_a_nested_toy_target():
    """A sphere with nested shells, signalled by intensity, is fitted by net + multi-level head."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ax = torch.arange(16.0) - 7.5
    r = torch.sqrt(ax.view(-1, 1, 1) ** 2 + ax.view(1, -1, 1) ** 2 + ax.view(1, 1, -1) ** 2)
    y = ((r < 7).long() + (r < 5).long() + (r < 3).long()).unsqueeze(0)
    x = torch.cat([y.float().unsqueeze(1) + 0.3 * torch.randn(1, 1, 16, 16, 16, generator=g)] * 4, 1)
    net = Isensee2017UNet(base_filters=4, levels=3, dropout=0.0)
    head = MultiLevelHead()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = head.loss(net(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    with torch.no_grad():
        acc = (head.labels(net.eval()(x)) == y).float().mean()
    assert float(loss) < 0.3 * first
    assert float(acc) > 0.95


@pytest.mark.gpu
def test_gpu_training_step_and_inference_match_cpu():
    from threefold.medical.segmentation import nesting_violations

    torch.manual_seed(0)
    net, head = Isensee2017UNet(base_filters=8, levels=4).eval(), MultiLevelHead(learnable_thresholds=True)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 4, (2, 32, 32, 32))
    with torch.no_grad():
        ref = net(x)
    net, head = net.cuda(), head.cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare full fp32 convolutions with the CPU
    try:
        with torch.no_grad():
            out = net(x.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
    net.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head.loss(net(x.cuda()).float(), y.cuda())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert int(nesting_violations(head.regions(out)).sum()) == 0
    print(f"gpu test: {torch.cuda.get_device_name()} loss {float(loss):.4f} max|cpu-gpu| {float((out.cpu() - ref).abs().max()):.2e}")
