"""benchmarks/train_step_profile.py on CPU: the profiled window runs through the real engine and the report has
its step times and operator table (a change to the engine's callbacks or the pipeline's run that bypasses the
window makes it fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profiles_a_window_of_qm9_uni3dar_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_profile.py"), "qm9-uni3dar",
                          "--device", "cpu", "--warmup", "7", "--steps", "2", "--rows", "5", "trainer.batch_size=16"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "step, inside a batch: median" in text and "step, batch start to batch start: median" in text
    assert "## self CPU time" in text and "aten::mm" in text  # the transformer's matmuls were profiled
    assert "## self CUDA time" not in text
