"""Crash-safe runs (issue #10 §3): a run SIGKILLed mid-epoch and resumed from its last checkpoint ends
with the uninterrupted run's weights and metrics, with the same batch order after the resume point.

The run (tests/reliability/resume_child.py) trains a point-cloud classifier on ragged batches built
with ``threefold.datasets.collate.collate_points``, through ``RunContext.fit`` — so the engine's
atomic checkpoints, ``ResumeStateCallback`` and ``ResumableDataLoader`` are what is tested: 40 clouds,
batch 4 (10 batches per epoch), 3 epochs, Adam with a per-step StepLR schedule, dropout, and random
jitter / loss weights drawn from torch's, NumPy's and Python's global generators. brats-multilevel
was not used: a 3-D U-Net run with several batches per epoch does not fit the CI budget on 2 cores.

Scenarios (checkpoint cadence, step at which the process kills itself with SIGKILL):
- ``mid-epoch``: checkpoints every 3 steps, killed at step 14 -> resumes at step 12 (epoch 1, batch 2);
- ``last-batch``: every 5 steps, killed at 11 -> the checkpoint is the last batch of epoch 0;
- ``epoch-end``: end-of-epoch checkpoints only, killed at 13 -> resumes at epoch 1, batch 0.
Two negative controls show the comparison can fail: a plain shuffling ``DataLoader`` (order lost),
and the resumable loader with the RNG restore switched off (dropout / jitter diverge).

DDP (2 gloo processes on CPU): the ranks' batches are disjoint and cover each epoch, the checkpoint
holds the mid-epoch position, and a run resumed from a mid-epoch checkpoint gives each rank the
batches it had and the generator states it had. (Resuming from an intermediate checkpoint stands in for the kill here: SIGKILL of
rank 0 would leave rank 1 blocked in a collective.)
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).with_name("resume_child.py")
TOTAL_STEPS = 30
DDP_RESUME_STEP = 12  # 2 ranks x batch 4: 5 steps per epoch; step 12 = epoch 2 after its 2nd batch
SCENARIOS = {  # name: (loader, checkpoint every n steps, kill at step, step the resume starts from)
    "mid-epoch": ("resumable", 3, 14, 12),
    "last-batch": ("resumable", 5, 11, 10),
    "epoch-end": ("resumable", 0, 13, 10),
    "control-plain-loader": ("plain", 3, 14, 12),
    "control-no-rng-restore": ("resumable-norng", 3, 14, 12),
}


def _start(root: Path, log: str, *jobs: tuple) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [",".join(map(str, job)) for job in jobs]
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=env, stdout=open(root / log, "w"),
                            stderr=subprocess.STDOUT)


def _steps(run_dir: Path) -> list[tuple[int, list[int]]]:
    return [(r["step"], r["index"]) for r in map(json.loads, (run_dir / "order.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every run of the module: the references (one process), each killed run (one process each, in
    parallel), then every resume (one process) — 7 interpreter start-ups in all, each single-threaded."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in [*SCENARIOS, "reference", "reference-plain", "ddp", "ddp-resumed"]}
    first = {name: _start(root, f"{name}.log", (dirs[name], loader, every, kill, 0))
             for name, (loader, every, kill, _) in SCENARIOS.items()}
    first["reference"] = _start(root, "reference.log", (dirs["reference"], "resumable", 3, -1, 0),
                                (dirs["reference-plain"], "plain", 3, -1, 0))
    first["ddp"] = _start(root, "ddp.log", (dirs["ddp"], "resumable", 4, -1, 0, 2))
    codes = {name: p.wait(timeout=600) for name, p in first.items()}
    for name, code in codes.items():
        expected = 0 if name in ("reference", "ddp") else -signal.SIGKILL
        assert code == expected, (name, code, (root / f"{name}.log").read_text()[-3000:])
    (dirs["ddp-resumed"] / "checkpoints").mkdir(parents=True)
    shutil.copy(dirs["ddp"] / "checkpoints" / f"step{DDP_RESUME_STEP}.ckpt", dirs["ddp-resumed"] / "checkpoints" / "last.ckpt")
    second = {"resume": _start(root, "resume.log", *[(dirs[name], loader, every, -1, 1)
                                                     for name, (loader, every, _, _) in SCENARIOS.items()]),
              "ddp-resumed": _start(root, "ddp-resumed.log", (dirs["ddp-resumed"], "resumable", 4, -1, 1, 2))}
    for name, p in second.items():
        assert p.wait(timeout=600) == 0, (root / f"{name}.log").read_text()[-3000:]
    return dirs


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "final.pt", weights_only=True)


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    return max((a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["mid-epoch", "last-batch", "epoch-end"])
def test_resumed_run_equals_uninterrupted_run(runs, scenario):
    _, _, kill_at, resume_from = SCENARIOS[scenario]
    ref, got = _final(runs["reference"]), _final(runs[scenario])
    steps = _steps(runs[scenario])
    executed = [s for s, _ in steps]
    # It really was killed mid-run and resumed from the checkpoint, not restarted from scratch.
    assert executed == list(range(kill_at)) + list(range(resume_from, TOTAL_STEPS)), executed
    assert got["global_step"] == ref["global_step"] == TOTAL_STEPS
    # Same batches, in the same order, after the resume point (and their first execution agrees too).
    ref_order = dict(_steps(runs["reference"]))
    assert dict(steps[kill_at:]) == {s: ref_order[s] for s in range(resume_from, TOTAL_STEPS)}
    assert sorted(i for s in range(10) for i in ref_order[s]) == list(range(40))  # an epoch = every sample once
    # Final weights and metrics equal (CPU, one thread, deterministic ops: in practice bit-identical).
    assert _max_weight_diff(got, ref) <= 1e-6
    assert got["metrics"].keys() == ref["metrics"].keys() and "val_loss" in ref["metrics"]
    for k, v in ref["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.mark.slow
@pytest.mark.parametrize("control, reference", [("control-plain-loader", "reference-plain"),
                                                ("control-no-rng-restore", "reference")])
def test_negative_controls_diverge(runs, control, reference):
    """Without the stateful loader, or without the RNG restore, the same kill/resume gives other
    weights: the equality above is evidence, not a tautology."""
    assert _max_weight_diff(_final(runs[control]), _final(runs[reference])) > 1e-4
    if control == "control-plain-loader":
        ref_order = dict(_steps(runs[reference]))
        assert any(ref_order[s] != idx for s, idx in _steps(runs[control])[14:])


def _rank_rows(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"order-rank{rank}.jsonl").read_text().splitlines()]


def _rank_steps(run_dir: Path, rank: int) -> dict[int, list[int]]:
    return {r["step"]: r["index"] for r in _rank_rows(run_dir, rank)}


def _rank_rng(run_dir: Path, rank: int) -> dict[int, str]:
    return {r["step"]: r["rng"] for r in _rank_rows(run_dir, rank)}


@pytest.mark.slow
def test_ddp_shards_and_mid_epoch_resume(runs):
    full = [_rank_steps(runs["ddp"], r) for r in (0, 1)]
    assert sorted(full[0]) == sorted(full[1]) == list(range(15))
    for epoch in range(3):
        steps = range(5 * epoch, 5 * epoch + 5)
        per_rank = [sum((full[r][s] for s in steps), []) for r in (0, 1)]
        assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == list(range(40))
    state = torch.load(runs["ddp"] / "checkpoints" / f"step{DDP_RESUME_STEP}.ckpt", weights_only=True)
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader["epoch"], loader["batches_done"], loader["num_replicas"]) == (2, 2, 2)
    for r in (0, 1):
        resumed = _rank_steps(runs["ddp-resumed"], r)
        assert sorted(resumed) == list(range(DDP_RESUME_STEP, 15))
        assert resumed == {s: full[r][s] for s in resumed}
    # Each rank resumes with its own generator states (dropout, jitter), not rank 0's.
    rng = [_rank_rng(runs["ddp"], r) for r in (0, 1)]
    assert rng[0][DDP_RESUME_STEP] != rng[1][DDP_RESUME_STEP]  # the ranks' states really differ
    for r in (0, 1):
        resumed = _rank_rng(runs["ddp-resumed"], r)
        assert resumed == {s: rng[r][s] for s in resumed}, r
