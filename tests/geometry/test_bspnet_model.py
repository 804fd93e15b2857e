"""BSP-Net network shapes, the paper's layer sizes, and the extraction/evaluation path end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.geometry.bspnet.evaluation import bspnet_metrics, inside_union, sample_triangles, surface_points
from threefold.geometry.bspnet.extraction import extract_bsp_mesh, parts_from_halfspaces
from threefold.geometry.bspnet.model import BSPNet


def test_paper_sizes():
    model = BSPNet()  # ef 32, p 4096, c 256
    enc = model.encoder
    assert [c.out_channels for c in [*enc.convs, enc.last]] == [32, 64, 128, 256, 256]
    assert all(c.kernel_size == (4, 4, 4) for c in [*enc.convs, enc.last])
    assert [c.stride[0] for c in [*enc.convs, enc.last]] == [2, 2, 2, 2, 1]
    dec = model.decoder
    assert [lin.out_features for lin in [*dec.hidden, dec.out]] == [512, 1024, 2048, 4 * 4096]
    assert model.T.shape == (4096, 256) and model.W.shape == (256, 1)


def test_forward_shapes_small():
    torch.manual_seed(0)
    model = BSPNet(ef_dim=4, p_dim=64, c_dim=8, phase=0)
    vox = (torch.rand(2, 1, 64, 64, 64) > 0.5).float()
    out = model(vox, torch.rand(2, 100, 3) - 0.5)
    assert out["planes"].shape == (2, 4, 64) and out["h2"].shape == (2, 100, 8) and out["h3"].shape == (2, 100, 1)
    assert float(out["h3"].detach().min()) >= 0 and float(out["h3"].detach().max()) <= 1
    with pytest.raises(ValueError, match="64, 64, 64"):
        model(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 3, 3))


def box(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return np.concatenate([np.c_[np.eye(3), -hi], np.c_[-np.eye(3), lo]])


def test_surface_protocol_discards_interior_faces():
    # Two boxes sharing the face x = 0: that face is interior and must get no sample.
    mesh = parts_from_halfspaces([box([-0.2, -0.1, -0.1], [0.0, 0.1, 0.1]), box([0.0, -0.1, -0.1], [0.2, 0.1, 0.1])])
    pts, nrm = surface_points(mesh, n_sample=16384, n_keep=4096, seed=0)
    assert len(pts) == 4096
    assert not np.any(np.abs(pts[:, 0]) < 1e-9)
    # exposed area: a 0.4 x 0.2 x 0.2 box (0.4), interior area 2 x 0.04 dropped -> ~1/6 of samples gone
    raw, _ = sample_triangles(mesh.vertices, mesh.triangles, 20000, seed=1)
    assert np.mean(np.abs(raw[:, 0]) < 1e-9) == pytest.approx(0.08 / 0.48, abs=0.01)
    assert not inside_union(np.array([[0.0, 0.0, 0.2]]), mesh.parts)[0]
    assert inside_union(np.array([[0.01, 0.0, 0.0]]), mesh.parts)[0]


def test_metrics_identical_and_shifted():
    mesh = parts_from_halfspaces([box([-0.2, -0.1, -0.1], [0.2, 0.1, 0.1])])
    p, n = surface_points(mesh, n_sample=4096, n_keep=1024, seed=0)
    q, m = surface_points(mesh, n_sample=4096, n_keep=1024, seed=1)
    same = bspnet_metrics(p, n, p, n)
    assert same["cd_x1000"] == 0 and same["nc"] == pytest.approx(1.0) and same["ecd_x1000"] == 0
    shifted = bspnet_metrics(p + np.array([0.05, 0, 0]), n, p, n)
    # every x-face point moves 0.05 off its face; CD > 0 and bounded by 2 * 0.05^2
    assert 0 < shifted["cd_x1000"] <= 2 * 0.05**2 * 1000 + 1e-9
    assert bspnet_metrics(q, m, p, n)["nc"] > 0.9  # neighbours across box edges have perpendicular normals


def test_extract_from_network_output_runs_on_input_device():
    torch.manual_seed(1)
    model = BSPNet(ef_dim=4, p_dim=32, c_dim=8, phase=1).eval()
    with torch.no_grad():
        planes = model.planes(torch.zeros(1, 1, 64, 64, 64))
    mesh = extract_bsp_mesh(planes[0], model.T)
    for part in mesh.parts:
        assert part.volume > 0


@pytest.mark.gpu
def test_cuda_bf16_train_step_and_extraction():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = BSPNet(ef_dim=8, p_dim=256, c_dim=32, phase=0).to(dev)
    vox = (torch.rand(4, 1, 64, 64, 64, device=dev) > 0.7).float()
    pts = torch.rand(4, 1024, 3, device=dev) - 0.5
    from threefold.geometry.bspnet.losses import bspnet_loss

    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(vox, pts)
        loss = bspnet_loss(out["h2"], out["h3"], (pts[..., :1] > 0).float(), model.T, model.W, 0)
    loss.total.backward()
    assert out["h3"].device.type == "cuda" and torch.isfinite(loss.total)
    assert model.T.grad is not None and model.T.grad.device.type == "cuda"
    cpu = BSPNet(ef_dim=8, p_dim=256, c_dim=32, phase=0)
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out_cpu = cpu(vox.cpu(), pts.cpu())
        out_gpu = model(vox, pts)  # float32 on GPU matches CPU
    torch.testing.assert_close(out_gpu["h3"].cpu(), out_cpu["h3"], atol=1e-4, rtol=1e-4)
    model.phase = 1
    with torch.no_grad():
        mesh = extract_bsp_mesh(model.planes(vox[:1])[0], model.T)
    assert all(p.volume > 0 for p in mesh.parts)
