"""Checkpoints and run folders (issue #10 §1, §3): written atomically (a process killed mid-write
leaves the previous complete checkpoint), loaded with weights_only (a checkpoint carrying code is
refused unexecuted, a truncated one raises a threefold error), run folders never reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.pipelines.engine import load_checkpoint, new_run_dir, save_atomic


def test_round_trip_and_no_temp_left(tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 7, "hyper_parameters": {"lr": 0.1}}
    save_atomic(state, tmp_path / "ck" / "last.ckpt")
    got = load_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert torch.equal(got["state_dict"]["w"], state["state_dict"]["w"]) and got["global_step"] == 7
    assert os.listdir(tmp_path / "ck") == ["last.ckpt"]


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from threefold.pipelines.engine import save_atomic
    path = sys.argv[1]
    def die(fd):  # the new checkpoint is partly on disk, the rename has not happened
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = die
    save_atomic({"global_step": 2, "w": torch.zeros(1_000_000)}, __import__("pathlib").Path(path))
""")


def test_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"global_step": 1, "w": torch.ones(3)}, path)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the child died before writing"
    got = load_checkpoint(path)
    assert got["global_step"] == 1 and torch.equal(got["w"], torch.ones(3))


def test_truncated_or_missing_checkpoint_raises_threefold_errors(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(DataFormatError, match="last.ckpt"):
            load_checkpoint(path)
    with pytest.raises(MissingFileError):
        load_checkpoint(tmp_path / "absent.ckpt")


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": Payload(str(marker))}, path)
    with pytest.raises(DataFormatError, match="evil.ckpt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_run_folders_are_never_reused(tmp_path):
    runs = {new_run_dir(tmp_path, "p") for _ in range(5)}
    assert len(runs) == 5 and all(r.is_dir() and not any(r.iterdir()) for r in runs)
    (next(iter(runs)) / "metrics.json").write_text("{}")
    assert new_run_dir(tmp_path, "p") not in runs
