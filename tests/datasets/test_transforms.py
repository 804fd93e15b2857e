"""Transforms: volume crops/pads against MONAI (data and affine), random crops checked voxel by voxel
in world coordinates, point augmentations against their analytic definitions, and seeding."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from threefold.datasets.errors import ConfigError, DataFormatError
from threefold.datasets.transforms import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomFlip,
    RandomJitter,
    RandomRotateZ,
    RandomScale,
    SpatialPad,
    crop_volume,
    pad_volume,
)

AFFINE = torch.tensor([[0.0, -1.5, 0.0, 30.0], [2.0, 0.0, 0.0, -12.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]],
                      dtype=torch.float64)
IMAGE = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 5, 6, 7)
LABEL = (torch.arange(5 * 6 * 7).reshape(1, 5, 6, 7) % 3).to(torch.int64)
VOLUME = {"image": IMAGE, "label": LABEL, "affine": AFFINE, "spacing": torch.tensor([2.0, 1.5, 3.0]), "name": "c"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ volumes
@pytest.mark.parametrize("size", [(8, 6, 9), (5, 11, 7), (3, 3, 3)])
def test_spatial_pad_matches_monai(size):
    monai = pytest.importorskip("monai")
    ours = SpatialPad(size, label_value=0)(VOLUME)
    ref = monai.transforms.SpatialPad(size)(monai.data.MetaTensor(IMAGE, affine=AFFINE))
    assert torch.equal(ours["image"], ref.as_tensor())
    assert torch.allclose(ours["affine"], ref.affine.to(torch.float64))
    assert ours["label"].shape[1:] == ours["image"].shape[1:] and ours["spacing"] is VOLUME["spacing"]


@pytest.mark.parametrize("size", [(2, 3, 4), (5, 6, 7), (4, 1, 6)])
def test_center_crop_matches_monai(size):
    monai = pytest.importorskip("monai")
    ours = CenterCrop(size)(VOLUME)
    ref = monai.transforms.CenterSpatialCrop(size)(monai.data.MetaTensor(IMAGE, affine=AFFINE))
    assert torch.equal(ours["image"], ref.as_tensor())
    assert torch.allclose(ours["affine"], ref.affine.to(torch.float64))


def _world(affine: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return idx.to(torch.float64) @ affine[:3, :3].T + affine[:3, 3]


def test_random_crop_keeps_world_positions_and_is_seeded():
    out = RandomCrop((3, 4, 2))(VOLUME, gen(11))
    assert out["image"].shape == (2, 3, 4, 2) and out["label"].shape == (1, 3, 4, 2)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in (3, 4, 2)], indexing="ij"), -1).reshape(-1, 3)
    # recover each cropped voxel's old index from its world position, then compare values
    old = torch.linalg.solve(AFFINE[:3, :3], (_world(out["affine"], idx) - AFFINE[:3, 3]).T).T
    assert torch.allclose(old, old.round(), atol=1e-9)
    old = old.round().long()
    assert torch.equal(out["image"][:, idx[:, 0], idx[:, 1], idx[:, 2]], IMAGE[:, old[:, 0], old[:, 1], old[:, 2]])
    assert torch.equal(out["label"][:, idx[:, 0], idx[:, 1], idx[:, 2]], LABEL[:, old[:, 0], old[:, 1], old[:, 2]])
    assert torch.equal(RandomCrop((3, 4, 2))(VOLUME, gen(11))["affine"], out["affine"])
    starts = {tuple(RandomCrop((3, 4, 2))(VOLUME, gen(s))["affine"][:3, 3].tolist()) for s in range(20)}
    assert len(starts) > 5
    with pytest.raises(DataFormatError, match="SpatialPad"):
        RandomCrop((9, 1, 1))(VOLUME, gen(0))


def test_pad_then_crop_is_identity_and_label_pads_with_ignore():
    padded = pad_volume(VOLUME, (1, 2, 0), (0, 1, 3))
    assert padded["image"].shape == (2, 6, 9, 10)
    assert int((padded["label"] == -1).sum()) == 6 * 9 * 10 - 5 * 6 * 7
    back = crop_volume(padded, (1, 2, 0), (5, 6, 7))
    assert torch.equal(back["image"], IMAGE) and torch.equal(back["label"], LABEL)
    assert torch.allclose(back["affine"], AFFINE)
    with pytest.raises(DataFormatError, match="does not fit"):
        crop_volume(VOLUME, (4, 0, 0), (2, 6, 7))


# ------------------------------------------------------------------------------------------- points
def _cloud(n: int = 500, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    coord = torch.randn(n, 3, generator=g) * 5
    return {"coord": coord, "feat": torch.rand(n, 2, generator=g), "label": torch.randint(-1, 4, (n,), generator=g)}


def test_rotate_z_is_a_rotation_about_z():
    s = _cloud()
    out = RandomRotateZ()(s, gen(5))
    a = math.atan2(out["coord"][0, 1], out["coord"][0, 0]) - math.atan2(s["coord"][0, 1], s["coord"][0, 0])
    rot = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    assert torch.allclose(out["coord"], s["coord"] @ rot.T, atol=1e-4)
    assert torch.equal(out["feat"], s["feat"]) and torch.equal(out["label"], s["label"])
    assert torch.equal(RandomRotateZ()(s, gen(5))["coord"], out["coord"])
    assert not torch.allclose(RandomRotateZ()(s, gen(6))["coord"], out["coord"])


def test_anisotropic_scale_keeps_normals_perpendicular_to_the_surface():
    # points on the plane n·x = 0; after scaling, the transformed normals must stay perpendicular
    n = torch.tensor([1.0, 2.0, 2.0]) / 3
    basis = torch.linalg.svd(n[None])[2][1:]
    coord = torch.randn(200, 2, generator=gen(1)) @ basis
    s = {"coord": coord, "normal": n.expand(200, 3).clone()}
    out = RandomScale(0.5, 2.0, anisotropic=True)(s, gen(2))
    k = out["coord"][:, 0] / coord[:, 0]
    assert torch.all((k >= 0.5) & (k <= 2.0)) and torch.allclose(k, k[0].expand_as(k), rtol=1e-4)
    assert torch.allclose((out["coord"] @ out["normal"][0]).abs().max(), torch.tensor(0.0), atol=1e-4)
    assert torch.allclose(out["normal"].norm(dim=1), torch.ones(200))
    with pytest.raises(ConfigError):
        RandomScale(0.0, 1.0)


def test_flip_and_jitter():
    s = _cloud()
    flips = [RandomFlip(p=0.5, axes=(0, 1))(s, gen(i))["coord"] / s["coord"] for i in range(16)]
    for ratio in flips:  # each axis either kept or mirrored as a whole; z never
        assert all(torch.allclose(ratio[:, j], ratio[0, j].expand(500)) and abs(ratio[0, j]) == 1 for j in range(3))
        assert ratio[0, 2] == 1
    assert len({tuple(r[0].tolist()) for r in flips}) == 4
    big = {"coord": torch.zeros(20000, 3)}
    noise = RandomJitter(sigma=0.01, clip=0.02)(big, gen(3))["coord"]
    assert noise.abs().max() <= 0.02
    # clamping N(0, 1) at ±c: E[X²] = (Φ(c) - Φ(-c)) - 2cφ(c) + 2c²(1 - Φ(c)), here c = clip / sigma = 2
    clipped_var = (norm.cdf(2) - norm.cdf(-2)) - 2 * 2 * norm.pdf(2) + 2 * 4 * norm.sf(2)
    assert noise.std().item() == pytest.approx(0.01 * math.sqrt(clipped_var), rel=0.03)


def test_compose_does_not_modify_its_input():
    s = _cloud()
    before = s["coord"].clone()
    t = Compose([RandomRotateZ(), RandomScale(), RandomFlip(), RandomJitter()])
    out = t(s, gen(0))
    assert torch.equal(s["coord"], before) and not torch.equal(out["coord"], before)
    assert torch.equal(t(s, gen(0))["coord"], out["coord"])


@pytest.mark.gpu
def test_point_transforms_follow_the_device():
    s = {k: v.cuda() for k, v in _cloud().items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    out = Compose([RandomRotateZ(), RandomScale(), RandomFlip(), RandomJitter()])(s, g)
    assert out["coord"].device.type == "cuda" and out["coord"].shape == s["coord"].shape
    rot = RandomRotateZ()(s, torch.Generator(device="cuda").manual_seed(1))["coord"]
    assert torch.allclose(rot[:, :2].norm(dim=1), s["coord"][:, :2].norm(dim=1), atol=1e-4)
    vol = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in VOLUME.items()}
    crop = RandomCrop((3, 4, 2))(vol, torch.Generator(device="cuda").manual_seed(0))
    assert crop["image"].device.type == "cuda" and crop["image"].shape == (2, 3, 4, 2)
