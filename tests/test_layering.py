"""The package layering: datasets at the bottom, the four domain packages above it, pipelines on top.

Parsed from the source with ``ast`` (no imports executed), so a forbidden import anywhere — also
inside a function — fails the test with the file and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["datasets", "geometry", "medical", "science", "graphs", "pipelines"]
MODULE_PATH = re.compile(r"threefold(\.[A-Za-z_]\w*)+")
ALLOWED = {
    "datasets": set(),
    "geometry": {"datasets"},
    "medical": {"datasets", "geometry"},
    "science": {"datasets", "geometry"},
    "graphs": {"datasets", "geometry"},
    "pipelines": set(PACKAGES),
}


def imported_siblings(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                parts = path.relative_to(REPO).parts[:-1]
                base = list(parts[: len(parts) - node.level + 1])
                names = [".".join(["threefold", *base, *(node.module.split(".") if node.module else [])])]
            else:
                names = [node.module or ""]
        # A module named in a string (importlib.import_module("threefold.geometry.x"), a registry's list)
        # is imported all the same, only later.
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.fullmatch(node.value):
            names = [node.value]
        for name in names:
            parts = name.split(".")
            if parts[0] == "threefold" and len(parts) > 1 and parts[1] in PACKAGES and parts[1] != package:
                found.append((node.lineno, parts[1]))
    return found


def test_layering_rules_hold():
    violations = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, target in imported_siblings(path, package):
                if target not in ALLOWED[package]:
                    violations.append(f"{path.relative_to(REPO)}:{line}: {package} imports threefold.{target}")
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_checker_catches_a_violation(tmp_path):
    bad = REPO / "datasets" / "_layering_probe_tmp.py"
    bad.write_text("def f():\n    from threefold.pipelines import cli\n\n\ndef g():\n"
                   "    return importlib.import_module('threefold.geometry.rapid.prepare')\n")
    try:
        assert imported_siblings(bad, "datasets") == [(2, "pipelines"), (6, "geometry")]
    finally:
        bad.unlink()


def test_no_bare_top_level_modules_in_wheel_layout():
    # Every folder installs under `threefold.`: nothing imports a bare `datasets`/`pipelines`/...
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    offenders += [f"{path}:{node.lineno}" for a in node.names if a.name.split(".")[0] in PACKAGES]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    if node.module.split(".")[0] in PACKAGES:
                        offenders.append(f"{path}:{node.lineno}")
    assert not offenders, offenders
