"""Point-MAE model pieces against brute-force NumPy / explicit references and the paper's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from threefold.datasets.errors import ConfigError
from threefold.geometry.pointmae import (
    PointMAE,
    PointMAEClassifier,
    count_parameters,
    group_points,
    max_pooled_features,
    nearest_visible_patch,
    patch_chamfer_l2,
    random_patch_mask,
)
from threefold.geometry.pointmae.model import PatchEmbed

TINY = dict(num_group=8, group_size=8, dim=24, depth=2, heads=2, embed_width=8)


def np_fps(p: np.ndarray, k: int) -> np.ndarray:
    idx, d = [0], ((p - p[0]) ** 2).sum(1)
    for _ in range(k - 1):
        idx.append(int(np.argmax(d)))
        d = np.minimum(d, ((p - p[idx[-1]]) ** 2).sum(1))
    return np.array(idx)


def test_group_points_equals_brute_force_fps_and_knn():
    pts = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    patches, centers = group_points(pts, 16, 10)
    for b in range(2):
        p = pts[b].numpy()
        c = p[np_fps(p, 16)]
        np.testing.assert_allclose(centers[b].numpy(), c)
        d = ((c[:, None] - p[None]) ** 2).sum(-1)
        nn_idx = np.argsort(d, 1, kind="stable")[:, :10]
        want = p[nn_idx] - c[:, None]
        np.testing.assert_allclose(np.sort(patches[b].numpy(), 1), np.sort(want, 1), atol=1e-12)


def test_random_mask_counts_and_seeding():
    g = torch.Generator().manual_seed(1)
    m = random_patch_mask(5, 64, 0.6, g)
    assert m.dtype == torch.bool and m.sum(1).tolist() == [38] * 5  # int(0.6 * 64)
    assert torch.equal(m, random_patch_mask(5, 64, 0.6, torch.Generator().manual_seed(1)))
    assert not torch.equal(m[0], m[1])
    # every patch is masked about 60 % of the time
    freq = random_patch_mask(4000, 16, 0.5, torch.Generator().manual_seed(2)).float().mean(0)
    assert (freq - 0.5).abs().max() < 0.04
    with pytest.raises(ConfigError):
        random_patch_mask(1, 8, 1.0)


def test_patch_embed_equals_the_papers_conv1d_formulation():
    torch.manual_seed(0)
    emb = PatchEmbed(dim=20, width=8).train()
    x = torch.randn(3, 5, 16, 3)
    # Independent reference: Conv1d(k=1) on channels-first patches with BatchNorm1d over (BG, C, k).
    convs = []
    for lin in (emb.first_conv[0], emb.first_conv[3], emb.second_conv[0], emb.second_conv[3]):
        c = nn.Conv1d(lin.in_features, lin.out_features, 1)
        c.weight.data = lin.weight.data[:, :, None].clone()
        c.bias.data = lin.bias.data.clone()
        convs.append(c)
    bn1, bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(32)
    h = convs[1](torch.relu(bn1(convs[0](x.reshape(15, 16, 3).transpose(1, 2)))))
    h = torch.cat([h.max(2, keepdim=True).values.expand(-1, -1, 16), h], 1)
    want = convs[3](torch.relu(bn2(convs[2](h)))).max(2).values.reshape(3, 5, 20)
    torch.testing.assert_close(emb(x), want, atol=1e-5, rtol=1e-5)


def test_patch_chamfer_l2_equals_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 8, 3)), rng.normal(size=(6, 8, 3))
    d = ((a[:, :, None] - b[:, None]) ** 2).sum(-1)
    want = (d.min(2).mean(1) + d.min(1).mean(1)).mean()
    assert patch_chamfer_l2(torch.from_numpy(a), torch.from_numpy(b)).item() == pytest.approx(want, rel=1e-12)


def test_nearest_visible_patch_equals_brute_force():
    rng = np.random.default_rng(4)
    patches, centers = rng.normal(size=(2, 10, 4, 3)), rng.normal(size=(2, 10, 3))
    mask = np.zeros((2, 10), bool)
    mask[0, [1, 4, 5, 8]] = True
    mask[1, [0, 2, 3, 9]] = True
    got = nearest_visible_patch(torch.from_numpy(patches), torch.from_numpy(centers), torch.from_numpy(mask))
    for b in range(2):
        vis, msk = np.flatnonzero(~mask[b]), np.flatnonzero(mask[b])
        for j, m in enumerate(msk):
            nearest = vis[np.argmin(((centers[b, vis] - centers[b, m]) ** 2).sum(1))]
            np.testing.assert_array_equal(got[b, j].numpy(), patches[b, nearest])


def block_params(c: int, mlp: int = 4) -> int:
    return 2 * 2 * c + 3 * c * c + (c * c + c) + (c * mlp * c + mlp * c) + (mlp * c * c + c)


def test_parameter_counts_match_the_paper_and_the_architecture():
    c, k = 384, 32
    embed = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * c + c)
    pos = (3 * 128 + 128) + (128 * c + c)
    encoder = embed + pos + 12 * block_params(c) + 2 * c
    pretrain = encoder + c + pos + 4 * block_params(c) + 2 * c + (c * 3 * k + 3 * k)
    head = (2 * c * 256 + 256) + 2 * 256 + (256 * 256 + 256) + 2 * 256 + (256 * 40 + 40)
    finetune = encoder + 2 * c + head
    mae, clf = PointMAE(), PointMAEClassifier(40)
    assert count_parameters(mae) == pretrain and count_parameters(clf) == finetune
    print(f"\nPoint-MAE pretrain {count_parameters(mae) / 1e6:.2f} M; fine-tune (ModelNet40) "
          f"{count_parameters(clf) / 1e6:.2f} M vs 22.1 M in the paper's Table 1")
    assert abs(count_parameters(clf) - 22.1e6) < 0.05e6


def test_mae_forward_shapes_masking_and_loss():
    torch.manual_seed(0)
    model = PointMAE(mask_ratio=0.5, decoder_depth=1, decoder_heads=2, **TINY)
    pts = torch.rand(3, 128, 3)
    out = model(pts, torch.Generator().manual_seed(0))
    assert out["pred"].shape == (3, 4, 8, 3) and out["mask"].sum(1).tolist() == [4, 4, 4]
    assert torch.equal(out["target"], out["patches"][out["mask"]].reshape(3, 4, 8, 3))
    want = patch_chamfer_l2(out["pred"].reshape(12, 8, 3), out["target"].reshape(12, 8, 3))
    assert out["loss"].item() == pytest.approx(want.item())
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    model = PointMAE(**TINY).eval()
    pts = torch.rand(1, 128, 3)
    patches, centers = group_points(pts, 8, 8)
    visible = torch.tensor([[True, False, True, True, False, True, False, False]])
    a = model.encoder(patches, centers, visible)
    changed = patches.clone()
    changed[0, 1] += 5.0  # a masked patch
    assert torch.equal(a, model.encoder(changed, centers, visible))
    changed[0, 2] += 5.0  # a visible patch
    assert not torch.allclose(a, model.encoder(changed, centers, visible))


def test_short_training_overfits_one_batch():
    torch.manual_seed(0)
    model = PointMAE(mask_ratio=0.5, decoder_depth=1, decoder_heads=2, drop_path=0.0, **TINY)
    pts = torch.rand(4, 128, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed = random_patch_mask(4, 8, 0.5, torch.Generator().manual_seed(0))
    first = model(pts, mask=fixed)["loss"].item()
    for _ in range(60):
        loss = model(pts, mask=fixed)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_classifier_loads_the_pretrained_encoder_and_refuses_mismatches():
    torch.manual_seed(0)
    mae = PointMAE(**TINY)
    clf = PointMAEClassifier(5, **TINY)
    n = clf.load_encoder({f"model.{k}": v for k, v in mae.state_dict().items()}, "ckpt")
    assert n == len(mae.encoder.state_dict())
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[k], v)
    clf.eval()
    pts = torch.rand(2, 128, 3)
    assert clf(pts).shape == (2, 5) and clf.features(pts).shape == (2, 48)
    feats = max_pooled_features(mae.encoder.eval(), pts, 8, 8)
    patches, centers = group_points(pts, 8, 8)
    torch.testing.assert_close(feats, mae.encoder(patches, centers).max(1).values)
    with pytest.raises(ConfigError, match="widths"):
        PointMAEClassifier(5, **{**TINY, "dim": 32}).load_encoder(mae.state_dict(), "ckpt")
    with pytest.raises(ConfigError, match="no encoder"):
        clf.load_encoder({"head.0.weight": torch.zeros(1)}, "other.ckpt")


@pytest.mark.gpu
def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    model = PointMAE(**TINY).eval()
    pts = torch.rand(2, 256, 3)
    mask = random_patch_mask(2, 8, 0.6, torch.Generator().manual_seed(0))
    cpu = model(pts, mask=mask)
    gpu = model.cuda()(pts.cuda(), mask=mask.cuda())
    torch.testing.assert_close(gpu["loss"].cpu(), cpu["loss"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu["pred"].cpu(), cpu["pred"], atol=1e-4, rtol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(3)
    assert model(pts.cuda(), g)["mask"].device.type == "cuda"
