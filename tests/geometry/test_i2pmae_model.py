"""I2P-MAE model pieces against brute-force references, the reference's parameter count, masking
invariances of the encoder, and a short training that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.geometry.i2pmae import (
    I2PMAE,
    HierarchicalEncoder,
    I2PMAEClassifier,
    hierarchical_groups,
    i2pmae_features,
    nearest_visible_members,
    random_teacher,
)
from threefold.geometry.i2pmae.encoder import pack_visible, three_nn_interpolate
from threefold.geometry.i2pmae.projection import project_views, sample_view_map
from threefold.geometry.pointmae import count_parameters, patch_chamfer_l2

TINY = dict(num_groups=(32, 16, 4), group_sizes=(8, 4, 4), dims=(16, 24, 32), depths=(1, 1, 1), heads=2,
            embed_width=8)


def tiny_teacher(dim: int = 8):
    return random_teacher(seed=0, width=32, layers=1, heads=2, output_dim=dim)


def np_fps(p: np.ndarray, k: int) -> np.ndarray:
    idx, d = [0], ((p - p[0]) ** 2).sum(1)
    for _ in range(k - 1):
        idx.append(int(np.argmax(d)))
        d = np.minimum(d, ((p - p[idx[-1]]) ** 2).sum(1))
    return np.array(idx)


def block_params(c: int) -> int:
    return 4 * c + 3 * c * c + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)


def test_parameter_count_is_the_references_12_9_m():
    """Counted from the reference modules' definitions (Token_Embed, positional MLPs, 5 blocks per
    scale, LayerNorm + Linear-BN-ReLU head), then checked against the built model."""
    dims = (96, 192, 384)
    embed0 = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * 96 + 96)

    def merge(ci: int, co: int) -> int:
        return (ci * ci + ci) + 2 * ci + (ci * ci + ci) + (2 * ci * co + co) + 2 * co + (co * co + co)

    encoder = embed0 + merge(96, 192) + merge(192, 384)
    encoder += sum((3 * c + c) + (c * c + c) + 5 * block_params(c) for c in dims)
    head = lambda w, n: (w * 256 + 256) + 512 + (256 * 256 + 256) + 512 + (256 * n + n)  # noqa: E731
    scan = encoder + 2 * 384 + head(768, 15)
    modelnet = encoder + 2 * 384 + head(384, 40)
    clf_scan = I2PMAEClassifier(15)
    clf_mn = I2PMAEClassifier(40, group_sizes=(48, 24, 24), radii=(0.24, 0.48, 0.96), pooling="sum")
    assert count_parameters(clf_scan) == scan and count_parameters(clf_mn) == modelnet
    pre = I2PMAE(random_teacher(output_dim=512))
    print(f"\nI2P-MAE fine-tune ScanObjectNN {scan / 1e6:.2f} M, ModelNet40 {modelnet / 1e6:.2f} M vs 12.9 M "
          f"(paper); pretraining (C = 512 teacher features) {count_parameters(pre) / 1e6:.2f} M")
    assert abs(scan - 12.9e6) / 12.9e6 < 0.05 and abs(modelnet - 12.9e6) / 12.9e6 < 0.05


def test_hierarchical_groups_equal_brute_force_fps_and_knn():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2, 200, 3)).astype(np.float32)
    scales = hierarchical_groups(torch.tensor(pts), (40, 20, 6), (8, 4, 4))
    source = pts
    for s in scales:
        for b in range(2):
            centers = source[b][np_fps(source[b], s.centers.shape[1])]
            np.testing.assert_array_equal(s.centers[b].numpy(), centers)
            d = ((centers[:, None] - source[b][None]) ** 2).sum(-1)
            want = np.sort(d, 1)[:, : s.members.shape[2]]
            got = np.take_along_axis(d, s.members[b].numpy(), 1)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.neighborhood + s.centers.unsqueeze(2), s.neighborhood_abs)
        source = s.centers.numpy()


def test_three_nn_interpolation_equals_brute_force():
    rng = np.random.default_rng(1)
    fine, coarse = rng.normal(size=(2, 30, 3)), rng.normal(size=(2, 9, 3))
    feats = rng.normal(size=(2, 9, 5))
    got = three_nn_interpolate(*(torch.tensor(a) for a in (fine, coarse, feats))).numpy()
    for b in range(2):
        for i in range(30):
            d = ((coarse[b] - fine[b, i]) ** 2).sum(1)
            nn3 = np.argsort(d)[:3]
            w = 1 / (d[nn3] + 1e-8)
            np.testing.assert_allclose(got[b, i], (w[:, None] * feats[b, nn3]).sum(0) / w.sum(), rtol=1e-10)


def test_padding_does_not_leak_into_visible_tokens():
    torch.manual_seed(0)
    enc = HierarchicalEncoder(TINY["dims"], TINY["depths"], 2, embed_width=8).eval()
    pts = torch.rand(2, 128, 3)
    scales = hierarchical_groups(pts, TINY["num_groups"], TINY["group_sizes"])
    masks = [torch.rand(2, s.centers.shape[1], generator=torch.Generator().manual_seed(i)) < 0.5
             for i, s in enumerate(scales)]
    masks[0][0, :] = True
    masks[0][0, :3] = False  # cloud 0: 3 visible at scale 0, so it is padded up to cloud 1's count
    out = enc(scales, masks)
    one = enc([type(s)(*(t[:1] for t in vars(s).values())) for s in scales], [m[:1] for m in masks])
    for a, b in zip(out, one):
        n = int(a.valid[0].sum())
        torch.testing.assert_close(a.tokens[0, :n], b.tokens[0, :n], atol=1e-5, rtol=1e-5)
    order, valid = pack_visible(masks[0].logical_not())
    assert valid[0].sum() == 3 and order[0, :3].tolist() == [0, 1, 2]


def test_local_attention_radius():
    torch.manual_seed(0)
    enc = HierarchicalEncoder(TINY["dims"], TINY["depths"], 2, embed_width=8).eval()
    pts = torch.rand(1, 128, 3)
    scales = hierarchical_groups(pts, TINY["num_groups"], TINY["group_sizes"])
    glob = enc(scales)[-1].tokens
    torch.testing.assert_close(enc(scales, radii=(10.0, 10.0, 10.0))[-1].tokens, glob)
    assert not torch.allclose(enc(scales, radii=(1e-6, 1e-6, 1e-6))[-1].tokens, glob)


def test_masked_attention_equals_the_references_additive_mask():
    """The reference adds -1e5 to the logits of tokens at distance >= radius; SDPA with a boolean mask."""
    from threefold.geometry.i2pmae.encoder import MaskedAttention

    torch.manual_seed(0)
    att = MaskedAttention(12, 3)
    x, xyz = torch.randn(2, 9, 12, dtype=torch.float64), torch.rand(2, 9, 3, dtype=torch.float64)
    att = att.double()
    dist = torch.cdist(xyz, xyz)
    got = att(x, (dist < 0.5).unsqueeze(1))
    q, k, v = att.qkv(x).reshape(2, 9, 3, 3, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * 4 ** -0.5 + (dist >= 0.5).double().unsqueeze(1) * -1e5
    want = att.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 12))
    torch.testing.assert_close(got, want)
    # A radius below every pairwise distance: each token attends only to itself -> proj(v_i).
    alone = att(x, (dist < 1e-9).unsqueeze(1))
    torch.testing.assert_close(alone, att.proj(v.transpose(1, 2).reshape(2, 9, 12)))


def test_forward_masks_targets_and_gradients():
    torch.manual_seed(0)
    model = I2PMAE(tiny_teacher(), mask_ratio=0.75, **TINY)
    pts = torch.rand(3, 128, 3)
    out = model(pts, torch.Generator().manual_seed(0))
    masks, scales = out["masks"], out["scales"]
    assert (~masks[2]).sum(1).tolist() == [1, 1, 1]  # 4 - int(0.75 * 4)
    for s in (1, 0):  # a lower token is visible iff it is a member of a visible parent
        for b in range(3):
            vis = set(scales[s + 1].members[b][~masks[s + 1][b]].flatten().tolist())
            assert set(torch.nonzero(~masks[s][b]).flatten().tolist()) == vis
    m = int(masks[1].sum())
    assert out["pred_3d"].shape == (m, 4, 3) and torch.equal(out["target_3d"], scales[1].neighborhood[masks[1]])
    torch.testing.assert_close(out["loss_3d"], patch_chamfer_l2(out["pred_3d"], out["target_3d"]))
    torch.testing.assert_close(out["loss"], out["loss_3d"] + out["loss_2d"])
    # 2D targets: each visible middle-scale token's 4 members read in the 3 views of its own cloud.
    images, geoms = project_views(pts)
    feats, _ = model.teacher(images.flatten(0, 1))
    feats = feats.reshape(3, 3, *feats.shape[1:])
    rows = []
    for b in range(3):
        for g in torch.nonzero(~masks[1][b]).flatten().tolist():
            members = scales[1].neighborhood_abs[b, g]  # (4, 3)
            rows.append(torch.cat([
                sample_view_map(feats[v, b:b + 1], members[None][..., list(axes)],
                                type(geoms[v])(geoms[v].origin[b:b + 1], geoms[v].grid[b:b + 1], geoms[v].offset[b:b + 1]))[0]
                for v, axes in enumerate([(0, 1, 2), (2, 0, 1), (1, 2, 0)])], -1))
    torch.testing.assert_close(out["target_2d"], torch.stack(rows))
    torch.testing.assert_close(out["loss_2d"], ((out["pred_2d"] - out["target_2d"]) ** 2).mean())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [] and not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    assert model.rec_head_2d.out_features == 3 * 4 * 8  # 3 views x 4 members x C


def test_nearest_visible_members_equals_brute_force():
    pts = torch.rand(2, 128, 3)
    s = hierarchical_groups(pts, (16,), (4,))[0]
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.6
    mask[:, 0] = False
    got = nearest_visible_members(s, mask)
    rows = []
    for b in range(2):
        c = s.centers[b].numpy()
        for g in np.flatnonzero(mask[b].numpy()):
            d = ((c - c[g]) ** 2).sum(1)
            d[mask[b].numpy()] = np.inf
            rows.append(s.neighborhood[b, int(np.argmin(d))])
    torch.testing.assert_close(got, torch.stack(rows))


def test_short_training_beats_the_nearest_visible_baseline():
    """A few dozen steps on one batch of smooth shapes: the masked-member Chamfer-L2 falls below the
    "learns nothing" baseline (each masked token's members copied from its nearest visible token)."""
    torch.manual_seed(0)
    model = I2PMAE(tiny_teacher(), mask_ratio=0.75, drop_path=0.0, **TINY)
    theta = torch.rand(4, 128, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([3.1416, 6.2832])
    radius = torch.tensor([0.6, 0.8, 1.0, 0.7]).view(4, 1, 1)
    pts = radius * torch.stack([theta[..., 0].sin() * theta[..., 1].cos(), theta[..., 0].sin() * theta[..., 1].sin(),
                                theta[..., 0].cos()], -1)
    with torch.no_grad():
        first = model.eval()(pts, torch.Generator().manual_seed(999))["loss_3d"]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(50):
        loss = model(pts, torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(pts, torch.Generator().manual_seed(999))
    base = patch_chamfer_l2(nearest_visible_members(out["scales"][1], out["masks"][1]), out["target_3d"])
    assert out["loss_3d"] < base and first > base  # untrained it is worse than the baseline


def test_classifier_loads_the_pretrained_encoder_and_svm_features():
    torch.manual_seed(0)
    model = I2PMAE(tiny_teacher(), **TINY)
    clf = I2PMAEClassifier(5, radii=(0.3, 0.6, 1.2), **TINY)
    n = clf.load_encoder({f"model.{k}": v for k, v in model.state_dict().items()}, "ckpt")
    assert n == len([k for k in model.encoder.state_dict() if not k.startswith("norms.")])
    clf.eval()
    pts = torch.rand(2, 128, 3)
    assert clf(pts).shape == (2, 5) and clf.features(pts).shape == (2, 64)
    feats = i2pmae_features(model.encoder.eval(), pts, TINY["num_groups"], TINY["group_sizes"])
    top = model.encoder(hierarchical_groups(pts, TINY["num_groups"], TINY["group_sizes"]))[-1].tokens
    torch.testing.assert_close(feats, model.encoder.norms[-1](top).max(1).values)
    with pytest.raises(ConfigError, match="widths"):
        I2PMAEClassifier(5, **{**TINY, "dims": (16, 24, 40)}).load_encoder(model.state_dict(), "ckpt")
    with pytest.raises(ConfigError, match="pooling"):
        I2PMAEClassifier(5, pooling="avg", **TINY)


@pytest.fixture
def no_tf32():
    """Exact fp32 on the GPU (cuDNN allows TF32 by default: the teacher's patch convolution) for the CPU comparison."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_cuda_forward_matches_cpu(no_tf32):
    torch.manual_seed(0)
    model = I2PMAE(tiny_teacher(), **TINY).eval()
    pts = torch.rand(2, 256, 3)
    cpu = model(pts, torch.Generator().manual_seed(0))
    model.cuda()
    gpu = model(pts.cuda(), torch.Generator().manual_seed(0))  # the mask is drawn on the CPU generator
    for s in range(3):
        assert torch.equal(gpu["masks"][s].cpu(), cpu["masks"][s])
    torch.testing.assert_close(gpu["loss_3d"].cpu(), cpu["loss_3d"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu["loss_2d"].cpu(), cpu["loss_2d"], atol=1e-4, rtol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(3)
    assert model(pts.cuda(), g)["masks"][0].device.type == "cuda"
    clf = I2PMAEClassifier(5, radii=(0.3, 0.6, 1.2), **TINY).eval()
    want = clf(pts)
    torch.testing.assert_close(clf.cuda()(pts.cuda()).cpu(), want, atol=1e-4, rtol=1e-4)
