"""benchmarks/scaling.py: prepared data read back exactly, the schedule, phase reports, step statistics."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("threefold_bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepared_pairs_are_the_generated_pairs(scaling, tmp_path, monkeypatch):
    import threefold.datasets.registration_phantoms as rp

    generate = rp.registration_phantom
    monkeypatch.setattr(rp, "registration_phantom", generate)  # restored after the test
    folder = tmp_path / "pairs"
    assert scaling.prepare_registration_pairs(folder, size=24, seed=3, max_displacement_vox=3.0, n_pairs=2, workers=1) == 2
    assert scaling.prepare_registration_pairs(folder, size=24, seed=3, max_displacement_vox=3.0, n_pairs=2, workers=1) == 0
    scaling.use_prepared_pairs(folder)
    assert rp.registration_phantom is not generate
    ds = rp.RegistrationPhantoms(2, size=24, seed=3, max_displacement_vox=3.0, split="train", cache=True)
    for i in range(2):
        ref = generate((3, 1, i), 24, 3.0)  # what the pipeline computes without the prepared files
        item = ds[i]
        for key in ("moving", "fixed", "moving_label", "fixed_label"):
            assert item[key].dtype == torch.from_numpy(ref[key]).dtype
            assert torch.equal(item[key][0], torch.from_numpy(ref[key])), key
        assert torch.equal(item["ddf_true"], torch.from_numpy(ref["ddf_true"]))
        assert torch.equal(item["affine"], torch.from_numpy(ref["affine"]))
    # a pair that was not prepared is an error, never generated on the fly
    with pytest.raises(scaling.PrepareError, match="prepare-only"):
        rp.RegistrationPhantoms(3, size=24, seed=3, max_displacement_vox=3.0, split="train")[2]
    with pytest.raises(scaling.PrepareError, match="size 32"):
        rp.RegistrationPhantoms(2, size=32, seed=3, max_displacement_vox=3.0, split="train")[0]


def test_missing_prepared_data_names_the_file(scaling, tmp_path):
    with pytest.raises(scaling.PrepareError, match=r"qm9_like_x2\.xyz missing.*--prepare-only"):
        scaling.prepare("qm9-uni3dar", tmp_path, tmp_path / "none.tar.xz", tmp_path / "none.xyz", True, 1, build=False)
    with pytest.raises(scaling.PrepareError, match=r"pairs\.json"):
        scaling.prepare("hcp-nestedmorph", tmp_path, tmp_path / "none.tar.xz", tmp_path / "none.xyz", True, 1, build=False)
    with pytest.raises(scaling.PrepareError, match=r"none\.xyz missing"):
        scaling.prepare("qm9-uni3dar", tmp_path, tmp_path / "none.tar.xz", tmp_path / "none.xyz", True, 1)


def _configs(precisions, pipelines, devices=(1, 2)):
    return [{"pipeline": p, "precision": q, "devices": n} for q in precisions for p in pipelines for n in devices]


@pytest.mark.parametrize("precisions", [["bf16-mixed"], ["bf16-mixed", "32-true"]])
@pytest.mark.parametrize("slots", [1, 2])
def test_schedule_runs_every_configuration_once_in_order(scaling, precisions, slots):
    configs = _configs(precisions, scaling.PIPELINES)
    rounds = scaling.schedule(configs, slots)
    flat = [c for r in rounds for c in r]
    assert sorted(map(id, flat)) == sorted(map(id, configs))
    position = {id(c): k for k, r in enumerate(rounds) for c in r}
    for r in rounds:
        assert len(r) <= slots
        assert all(c["devices"] == 1 for c in r) or len(r) == 1  # a 2-GPU run has the machine to itself
    for c in configs:
        if c["devices"] > 1:  # after every 1-GPU configuration of its pipeline
            ones = [o for o in configs if o["devices"] == 1 and o["pipeline"] == c["pipeline"]]
            assert all(position[id(o)] < position[id(c)] for o in ones)
    if slots == 2 and len(precisions) == 1:  # one call per precision: two pipelines side by side
        assert [[c["pipeline"] for c in r] for r in rounds] == [
            ["semantickitti-rapidseg", "hcp-nestedmorph"], ["semantickitti-rapidseg"], ["hcp-nestedmorph"],
            ["brats-multilevel", "qm9-uni3dar"], ["brats-multilevel"], ["qm9-uni3dar"]]


def test_phase_report_names_where_each_rank_was(scaling, tmp_path):
    out = tmp_path / "result1.json"
    t0 = 1000.0
    (tmp_path / "result1.json.phases.0").write_text(
        "".join(json.dumps({"phase": p, "t": t0 + t}) + "\n" for p, t in
                [("start", 0.5), ("imported", 6.0), ("data_ready", 9.25), ("ddp_ready", 31.0)]) + '{"phase": "tr')
    (tmp_path / "result1.json.phases.1").write_text(json.dumps({"phase": "start", "t": t0 + 10.0}) + "\n")
    phases = scaling.read_phases(str(out), t0)
    assert phases == {0: {"start": 0.5, "imported": 6.0, "data_ready": 9.25, "ddp_ready": 31.0}, 1: {"start": 10.0}}
    text = scaling.where_stuck(phases, 2)
    assert "rank 0 in 'ddp_ready -> train_start' (since 31.0 s)" in text
    assert "rank 1 in 'start -> imported' (since 10.0 s)" in text
    assert "rank 1 had not started" in scaling.where_stuck({0: {"start": 0.1}}, 2)
    assert scaling.format_phases(phases).startswith("rank 0: start 0.5 imported 6.0 data_ready 9.2")


def test_step_statistics_against_numpy(scaling):
    rng = np.random.default_rng(0)
    intervals = rng.uniform(0.05, 0.3, size=(2, 13))
    stats = scaling.step_statistics(intervals.tolist(), batch=4)
    per_step = intervals.max(0)  # a step ends when its slowest rank ends it
    np.testing.assert_allclose(stats["median_step_ms"], 1000 * np.median(per_step))
    np.testing.assert_allclose(stats["p10_step_ms"], 1000 * np.percentile(per_step, 10))
    np.testing.assert_allclose(stats["p90_step_ms"], 1000 * np.percentile(per_step, 90))
    np.testing.assert_allclose(stats["samples_per_s"], 4 * 2 * 13 / intervals.sum(1).max())
    np.testing.assert_allclose(stats["rank_median_ms"], 1000 * np.median(intervals, axis=1))


@pytest.mark.slow
def test_cpu_smoke_run_of_one_pipeline(tmp_path):
    """The CPU smoke path end to end: prepare, 1 and 2 gloo processes, phases, table, JSON rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--pipelines", "hcp-nestedmorph",
           "--precisions", "32-true", "--data-dir", str(tmp_path / "data"), "--json", str(tmp_path / "rows.json"),
           "--prepare-workers", "1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["devices"], r["ok"]) for r in rows] == [(1, True), (2, True)]
    for r in rows:
        assert r["timed_steps"] == 2 and r["world_size"] == r["devices"]
        for rank in range(r["devices"]):
            stamps = r["phases"][str(rank)]
            assert list(stamps) == [p for p in stamps if p in ("start", "imported", "data_ready", "ddp_ready",
                                                                  "train_start", "first_step", "warmup_done", "timed_done")]
            assert "timed_done" in stamps and stamps["start"] <= stamps["first_step"] <= stamps["timed_done"]
    assert "8 training pairs of 32³ (8 generated now)" in done.stdout
    assert "| hcp-nestedmorph | 32-true | 2 | 1 |" in done.stdout
