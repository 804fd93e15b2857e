"""Ragged point collate (Pointcept offsets) against NumPy concatenation, its inverse, and volume stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from threefold.datasets.collate import (
    batch_to_offset,
    collate_points,
    collate_volumes,
    offset_to_batch,
    split_by_offset,
)
from threefold.datasets.errors import DataFormatError

SIZES = [5, 0, 12, 3]


def _samples(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"coord": torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32)),
         "feat": torch.from_numpy(rng.random((n, 4)).astype(np.float32)),
         "label": torch.from_numpy(rng.integers(-1, 5, n)), "name": f"s{i}"}
        for i, n in enumerate(sizes)
    ]


def test_collate_points_concatenates_with_cumulative_offset():
    samples = _samples()
    batch = collate_points(samples)
    for key in ("coord", "feat", "label"):
        assert np.array_equal(batch[key].numpy(), np.concatenate([s[key].numpy() for s in samples]))
    assert batch["offset"].dtype == torch.int64 and batch["offset"].tolist() == np.cumsum(SIZES).tolist()
    assert batch["name"] == ["s0", "s1", "s2", "s3"]
    parts = split_by_offset(batch["coord"], batch["offset"])
    assert all(torch.equal(p, s["coord"]) for p, s in zip(parts, samples))
    # brute force: sample index of every point
    assert offset_to_batch(batch["offset"]).tolist() == [b for b, n in enumerate(SIZES) for _ in range(n)]
    assert torch.equal(batch_to_offset(offset_to_batch(batch["offset"])), batch["offset"][: 4])


def test_collate_points_errors():
    samples = _samples()
    samples[2]["feat"] = samples[2]["feat"][:, :3]
    with pytest.raises(DataFormatError, match="sample 2 'feat'"):
        collate_points(samples)
    samples = _samples()
    samples[1]["label"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(DataFormatError, match="sample 1 'label'.*0 rows"):
        collate_points(samples)
    samples = _samples()
    del samples[3]["label"]
    with pytest.raises(DataFormatError, match="sample 3 has fields"):
        collate_points(samples)
    with pytest.raises(DataFormatError, match="empty"):
        collate_points([])
    with pytest.raises(DataFormatError, match="offset"):
        split_by_offset(torch.zeros(5, 3), torch.tensor([2, 4]))
    with pytest.raises(DataFormatError, match="sorted"):
        batch_to_offset(torch.tensor([0, 1, 0]))


def test_collate_volumes_keeps_per_sample_geometry():
    samples = [{"image": torch.full((2, 3, 4, 5), float(b)), "label": torch.full((1, 3, 4, 5), b),
                "affine": torch.eye(4, dtype=torch.float64) * (b + 1), "spacing": torch.ones(3) * (b + 1)}
               for b in range(3)]
    batch = collate_volumes(samples)
    assert batch["image"].shape == (3, 2, 3, 4, 5) and batch["label"].shape == (3, 1, 3, 4, 5)
    assert batch["image"][:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert isinstance(batch["affine"], list) and [a[0, 0].item() for a in batch["affine"]] == [1.0, 2.0, 3.0]
    assert [s[0].item() for s in batch["spacing"]] == [1.0, 2.0, 3.0]
    samples[1]["image"] = torch.zeros(2, 3, 4, 6)
    with pytest.raises(DataFormatError, match="sample 1 'image'.*crop or pad"):
        collate_volumes(samples)


@pytest.mark.gpu
def test_collate_points_on_cuda():
    samples = [{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in _samples()]
    batch = collate_points(samples)
    assert batch["offset"].device.type == "cuda" and batch["offset"].tolist() == np.cumsum(SIZES).tolist()
    assert offset_to_batch(batch["offset"]).device.type == "cuda"
