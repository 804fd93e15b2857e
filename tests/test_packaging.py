"""The built wheel installs every subpackage under `threefold.` with its package data, and
`threefold doctor` reports conflicting installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def source_subpackages() -> list[str]:
    names = ["threefold"]
    for init in sorted(REPO.glob("*/**/__init__.py")):
        rel = init.parent.relative_to(REPO)
        if rel.parts[0] in {"pipelines", "geometry", "medical", "science", "graphs", "datasets"}:
            names.append("threefold." + ".".join(rel.parts))
    return names


@pytest.mark.slow
def test_wheel_installs_every_subpackage_and_configs(tmp_path):
    # Build from a copy without build/ leftovers, which setuptools would otherwise reuse.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv*", "runs", "__pycache__", ".whl", ".gpu*"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
    )
    (wheel,) = wheels.glob("threefold-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    assert not (target / "datasets").exists(), "a bare top-level `datasets` would shadow Hugging Face datasets"
    names = source_subpackages()
    script = (
        "import importlib, pathlib, threefold\n"
        f"assert pathlib.Path(threefold.__file__).is_relative_to({str(target)!r}), threefold.__file__\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "from threefold.pipelines.config import shipped_config_path\n"
        "assert shipped_config_path('planetoid-gcn').is_file()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shipped = {p.name for p in (target / "threefold" / "pipelines" / "configs").glob("*.yaml")}
    assert shipped == {p.name for p in (REPO / "pipelines" / "configs").glob("*.yaml")}


def _doctor(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "threefold.pipelines.cli", "doctor"], env=env, capture_output=True, text=True)


def _fake_dist(site: Path, name: str, version: str = "2.3.8") -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_doctor_reports_versions_and_cuda():
    out = _doctor({})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "threefold 0." in out.stdout and "CUDA available:" in out.stdout and "spconv build:" in out.stdout


def test_doctor_fails_on_two_spconv_builds(tmp_path):
    _fake_dist(tmp_path, "spconv-cu126")
    _fake_dist(tmp_path, "spconv")
    out = _doctor({"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1
    assert "CONFLICT" in out.stdout and "spconv-cu126" in out.stdout


def test_doctor_fails_on_open3d_and_open3d_cpu(tmp_path):
    _fake_dist(tmp_path, "open3d-cpu", "0.20.0")
    _fake_dist(tmp_path, "open3d", "0.20.0")
    out = _doctor({"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1 and "open3d-cpu" in out.stdout


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "threefold.pipelines.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("threefold ")
