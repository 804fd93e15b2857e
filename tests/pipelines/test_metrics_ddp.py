"""Every streaming metric under 2 and 3 gloo processes equals the single-process result: integer
states exactly, float results within 1e-6 relative, with uneven last batches and a shuffling,
padding DistributedSampler whose duplicates are kept out by the real-sample mask.

Each world size starts its processes once (forked from the test process) and runs every metric in
that one start.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from threefold.datasets.errors import ConfigError
from threefold.pipelines.metrics.distributed import batch_real_mask, real_sample_mask

N_SAMPLES = 13  # W=2: 7 per rank (1 padded), batches 3,3,1; W=3: 5 per rank (2 padded), batches 3,2
BATCH_SIZE = 3
N_CLASSES = 4
INT_STATES = {"seg": ["confmat"], "cls": ["confmat"], "acc": ["correct", "total"], "overlap": ["count"],
              "mol": ["molecules", "valid", "atoms", "stable_atoms", "stable_molecules"]}
N_MOLECULES = 5  # sample i holds embedded molecule i % 5: duplicates across ranks test global uniqueness


def _molecules() -> list[tuple]:
    """Real molecules (the package's embedded ETKDG conformers) and, every second one, a copy with its
    atoms collapsed onto a line (invalid): (numbers (N,), positions (N, 3) Å) pairs."""
    from threefold.datasets.molecule_samples import embedded_molecules

    mols = []
    for k, m in enumerate(embedded_molecules(limit=N_MOLECULES)):
        numbers, positions = m["numbers"], m["positions"]
        if k % 2:
            positions = positions * [1.0, 0.0, 0.0]
        mols.append((numbers, positions))
    return mols


class _Samples(Dataset):
    """Sample i is generated from seed i, so every process builds the same data independently."""

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        seg_target = torch.randint(-1, N_CLASSES, (40,), generator=g)
        seg_noise = torch.randint(-1, N_CLASSES, (40,), generator=g)
        seg_pred = torch.where(torch.rand(40, generator=g) < 0.5, seg_target, seg_noise)
        logits = torch.randn(6, N_CLASSES, generator=g, dtype=torch.float64)
        link_target = torch.randint(0, 2, (8,), generator=g)
        link_score = torch.round(torch.randn(8, generator=g, dtype=torch.float64) + link_target, decimals=1)
        blob = torch.rand(2, 8, 8, 8, generator=g)
        image = torch.rand(1, 8, 8, 8, generator=g, dtype=torch.float64)
        return {
            "seg_pred": seg_pred,
            "seg_target": seg_target,
            "logits": logits,
            "cls_target": torch.randint(0, N_CLASSES, (6,), generator=g),
            "link_score": link_score,
            "link_target": link_target,
            "mask_pred": blob > 0.55,
            "mask_target": blob > 0.45,
            "image_x": image,
            "image_y": image + 0.1 * torch.randn(1, 8, 8, 8, generator=g, dtype=torch.float64),
            "disp": 0.3 * torch.randn(3, 7, 6, 6, generator=g, dtype=torch.float64),
            "cloud_x": torch.rand(32, 3, generator=g, dtype=torch.float64),
            "cloud_y": torch.rand(40, 3, generator=g, dtype=torch.float64),
            "normal_x": torch.randn(32, 3, generator=g, dtype=torch.float64),
            "normal_y": torch.randn(40, 3, generator=g, dtype=torch.float64),
            "molecule": torch.tensor(i % N_MOLECULES),
        }


def _metrics() -> dict:
    from threefold.pipelines.metrics import (
        BinaryRankingMetrics,
        ClassificationMetrics,
        DeformationMetrics,
        ImageSimilarityMetrics,
        MoleculeGenerationMetrics,
        MulticlassAccuracy,
        PointSetMetrics,
        SegmentationOverlapMetrics,
        SemanticSegmentationMetrics,
    )

    return {
        "seg": SemanticSegmentationMetrics(N_CLASSES),
        "cls": ClassificationMetrics(N_CLASSES),
        "acc": MulticlassAccuracy(),
        "rank": BinaryRankingMetrics(),
        "overlap": SegmentationOverlapMetrics(["A", "B"], spacing=(1.0, 1.5, 2.0)),
        "image": ImageSimilarityMetrics(data_range=1.0),
        "deform": DeformationMetrics(),
        "points": PointSetMetrics(squared=True, reduction="sum", fscore_threshold=0.1),
        "mol": MoleculeGenerationMetrics(training_smiles=["CCO", "C"]),
    }


def _update_all(metrics: dict, b: dict[str, torch.Tensor]) -> None:
    metrics["seg"].update(b["seg_pred"].reshape(-1), b["seg_target"].reshape(-1))
    metrics["cls"].update(b["logits"].reshape(-1, N_CLASSES), b["cls_target"].reshape(-1))
    metrics["acc"].update(b["logits"].reshape(-1, N_CLASSES), b["cls_target"].reshape(-1))
    metrics["rank"].update(b["link_score"].reshape(-1), b["link_target"].reshape(-1))
    metrics["overlap"].update(b["mask_pred"], b["mask_target"])
    metrics["image"].update(b["image_x"], b["image_y"])
    metrics["deform"].update(b["disp"])
    metrics["points"].update(b["cloud_x"], b["cloud_y"], b["normal_x"], b["normal_y"])
    metrics["mol"].update([MOLECULES[j] for j in b["molecule"].tolist()])


def _results(metrics: dict) -> dict:
    """compute() of every metric plus its synced integer states (collective on every rank)."""
    out = {}
    for name, m in metrics.items():
        value = m.compute()
        out[name] = {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else {"value": value.clone()}
        with m.sync_context():
            for state in INT_STATES.get(name, []):
                out[name][f"state:{state}"] = getattr(m, state).clone()
    return out


MOLECULES = _molecules()  # before any fork: every rank reads the same list


def test_every_streaming_metric_of_the_layer_is_covered():
    """A metric added to threefold.pipelines.metrics must join the multi-process comparison below."""
    import threefold.pipelines.metrics as layer
    from torchmetrics import Metric

    exported = {name for name in layer.__all__ if isinstance(getattr(layer, name), type) and issubclass(getattr(layer, name), Metric)}
    assert exported == {type(m).__name__ for m in _metrics().values()}


def _single_process() -> dict:
    metrics = _metrics()
    for batch in DataLoader(_Samples(), batch_size=BATCH_SIZE):
        _update_all(metrics, batch)
    return _results(metrics)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from threefold.pipelines.metrics import MulticlassAccuracy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sampler = DistributedSampler(_Samples(), num_replicas=world, rank=rank, shuffle=True, seed=7)
    metrics = _metrics()
    naive = MulticlassAccuracy()  # fed every sample the sampler yields, padding included
    seen = []
    for batch_idx, batch in enumerate(DataLoader(_Samples(), batch_size=BATCH_SIZE, sampler=sampler)):
        naive.update(batch["logits"].reshape(-1, N_CLASSES), batch["cls_target"].reshape(-1))
        real = batch_real_mask(sampler, batch_idx, BATCH_SIZE, len(batch["disp"]))
        _update_all(metrics, {k: v[real] for k, v in batch.items()})
        seen.append(len(batch["disp"]))
    out = _results(metrics)
    naive.compute()
    with naive.sync_context():
        out["naive_total"] = naive.total.clone()
    out["batch_lengths"] = seen
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_world(world: int, tmp_path: Path) -> list[dict]:
    # fork: the children inherit the imported torch / torchmetrics instead of re-importing them
    # (seconds per process on a loaded 2-core CI machine)
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(rank, world, str(tmp_path / "store"), str(tmp_path))) for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"ranks of a {world}-process run exited with {codes} (tracebacks in captured stderr)"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_equal_results(dist_out: dict, ref: dict, world: int) -> None:
    for name, values in ref.items():
        for key, expected in values.items():
            got = dist_out[name][key]
            where = f"{name}/{key} under {world} processes"
            if key.startswith("state:") or not expected.is_floating_point():
                assert torch.equal(got, expected), f"{where}: {got} != {expected}"
            else:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0, msg=where)


@pytest.mark.parametrize(("n", "world", "shuffle"), [(13, 2, True), (13, 3, False), (2, 5, True), (12, 4, True)])
def test_real_sample_mask_keeps_each_index_once(n, world, shuffle):
    kept = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        indices = torch.tensor(list(sampler))
        kept += indices[real_sample_mask(sampler)].tolist()
        assert len(indices) == len(sampler)
    assert sorted(kept) == list(range(n))


def test_real_sample_mask_refuses_dropping_samples_and_checks_batches():
    with pytest.raises(ConfigError, match="drop_last"):
        real_sample_mask(DistributedSampler(range(13), num_replicas=2, rank=0, drop_last=True))
    sampler = DistributedSampler(range(13), num_replicas=3, rank=2, shuffle=False)
    assert batch_real_mask(sampler, 1, 3, 2).tolist() == [True, False]  # positions 11 and 14 of 15
    with pytest.raises(ConfigError, match="runs past"):
        batch_real_mask(sampler, 1, 3, 3)
    assert real_sample_mask(SequentialSampler(range(4))).tolist() == [True] * 4


def test_every_metric_matches_single_process_under_2_and_3_ranks(tmp_path):
    ref = _single_process()
    assert ref["acc"]["state:total"].item() == N_SAMPLES * 6
    for world in (2, 3):
        d = tmp_path / f"world{world}"
        d.mkdir()
        per_rank = _run_world(world, d)
        padded = -N_SAMPLES % world
        for rank, out in enumerate(per_rank):
            _assert_equal_results(out, ref, world)
            # the sampler really padded: feeding every yielded sample counts duplicates
            assert out["naive_total"].item() == (N_SAMPLES + padded) * 6
            assert out["batch_lengths"][-1] < BATCH_SIZE
        assert padded > 0


@pytest.mark.gpu
def test_every_metric_on_cuda_matches_cpu():
    ref = _single_process()
    metrics = {name: m.to("cuda") for name, m in _metrics().items()}
    for batch in DataLoader(_Samples(), batch_size=BATCH_SIZE):
        _update_all(metrics, {k: v.cuda() for k, v in batch.items()})
    out = _results(metrics)
    for name, values in out.items():
        for key, got in values.items():
            assert got.device.type == "cuda", f"{name}/{key} left the input's device"
    _assert_equal_results({n: {k: v.cpu() for k, v in vals.items()} for n, vals in out.items()}, ref, world=1)
