"""Safe loading everywhere (issue #10 §1): a static scan of the package source so that code landing
later keeps the promise. Refused: ``torch.load`` / ``load_from_checkpoint`` without
``weights_only=True``, ``pickle.load(s)`` / ``pickle.Unpickler`` outside the restricted unpickler,
``yaml.load`` / ``yaml.unsafe_load`` / ``yaml.full_load``, ``np.load(..., allow_pickle=True)``,
``torch.jit.load`` outside the one place that requires ``trust_torchscript=True``, and the builtins
``eval`` / ``exec``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("datasets", "geometry", "graphs", "medical", "pipelines", "science", "benchmarks")
ALLOWED_PICKLE = {Path("datasets/safe_pickle.py")}
# TorchScript archives carry code: loaded in one place, behind an explicit trust_torchscript=True.
ALLOWED_JIT_LOAD = {Path("geometry/i2pmae/teacher.py")}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (REPO / pkg).is_dir() for p in (REPO / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def violations(path: Path, rel: Path) -> list[str]:
    """Unsafe calls in ``path`` (reported as ``rel``, its path inside the repository)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{rel}:{node.lineno}"
        if name == "torch.load" and not _kw_true(node, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name.endswith(".load_from_checkpoint") and not _kw_true(node, "weights_only"):
            found.append(f"{where}: load_from_checkpoint without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load") and rel not in ALLOWED_PICKLE:
            found.append(f"{where}: {name} (use threefold.datasets.safe_pickle.safe_load_pickle)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{where}: {name} (use yaml.safe_load)")
        elif name in ("np.load", "numpy.load") and _kw_true(node, "allow_pickle"):
            found.append(f"{where}: np.load(allow_pickle=True)")
        elif name == "torch.jit.load" and rel not in ALLOWED_JIT_LOAD:
            found.append(f"{where}: torch.jit.load (TorchScript carries code)")
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            found.append(f"{where}: builtin {node.func.id}()")
    return found


def test_package_source_has_no_unsafe_loading():
    sources = _sources()
    assert len(sources) > 20, "the scan found too few files; is REPO right?"
    bad = [v for p in sources for v in violations(p, p.relative_to(REPO))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("snippet, expected", [
    ("import torch\ntorch.load('a')", "weights_only"),
    ("import torch\ntorch.load('a', weights_only=False)", "weights_only"),
    ("import pickle\npickle.loads(b'')", "pickle.loads"),
    ("import yaml\nyaml.load('a')", "yaml.load"),
    ("import numpy as np\nnp.load('a', allow_pickle=True)", "allow_pickle"),
    ("eval('1')", "eval"),
    ("M.load_from_checkpoint('a')", "load_from_checkpoint"),
    ("import torch\ntorch.jit.load('a')", "torch.jit.load"),
])
def test_the_scan_catches_each_pattern(tmp_path, snippet, expected):
    probe = tmp_path / "probe.py"
    probe.write_text(snippet)
    assert any(expected in v for v in violations(probe, Path("datasets/probe.py")))
    probe.write_text("import torch, yaml\ntorch.load('a', weights_only=True)\nyaml.safe_load('a')\nmodule.eval()\n")
    assert violations(probe, Path("datasets/probe.py")) == []
