"""Shared fixtures. Real data comes from $THREEFOLD_TEST_DATA (default ../shared/data beside the
repository); tests that need it skip with a reason when it is absent, and .ci/run checks that it is
present so CI never skips them silently."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# shared test helpers (tests/figure_checks.py) import by plain name under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_data_root() -> Path:
    return Path(os.environ.get("THREEFOLD_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Root of the real test data (see its PROVENANCE.md); skips when absent."""
    root = test_data_root()
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set THREEFOLD_TEST_DATA)")
    return root


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
