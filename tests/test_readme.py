"""Docs that work when pasted: README's quick start and every block marked ``runnable`` in the docs.

A fenced block whose info string is ``python runnable`` or ``bash runnable`` is executed in a fresh
temporary folder; README's quick-start run command is executed as written, and its test command is
checked to be exactly what `.ci/run` executes (running the suite from inside the suite would recurse).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def quickstart(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(f"<!-- quickstart:{marker} -->", 1)[1]
    lang, _, body = FENCE.search(after).groups()
    assert lang == "bash"
    return body.strip()


def runnable_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for md in sorted([REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("*/README.md")]):
        for lang, info, body in FENCE.findall(md.read_text()):
            if "runnable" in info.split():
                blocks.append((f"{md.relative_to(REPO)}:{lang}", lang, body))
    return blocks


@pytest.mark.slow
def test_quickstart_run_command(tmp_path):
    cmd = quickstart("run")
    assert "threefold run planetoid-gcn" in cmd
    before = set((REPO / "runs" / "planetoid-gcn").glob("*")) if (REPO / "runs" / "planetoid-gcn").is_dir() else set()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    new = set((REPO / "runs" / "planetoid-gcn").glob("*")) - before
    try:
        assert len(new) == 1
        metrics = json.loads((next(iter(new)) / "metrics.json").read_text())
        assert metrics["dataset"] == "karate" and len(metrics["per_seed"]) == 5
        assert 0.0 <= metrics["test_acc_mean"] <= 1.0
    finally:
        for run in new:
            shutil.rmtree(run)


def test_quickstart_test_command_is_what_ci_runs():
    cmd = quickstart("test")
    assert cmd.endswith('pytest -m "not gpu"')
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- quickstart:test -->" in ci and 'bash -euo pipefail -c "$cmd"' in ci


@pytest.mark.parametrize("where,lang,body", runnable_blocks() or [pytest.param("", "", "", marks=pytest.mark.skip("no runnable blocks"))])
def test_runnable_doc_blocks(where, lang, body, tmp_path):
    argv = [sys.executable, "-c", body] if lang == "python" else ["bash", "-euo", "pipefail", "-c", body]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{where}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
