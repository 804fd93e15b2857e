"""``threefold doctor``: what is installed, what is missing, and installs that conflict."""

from __future__ import annotations

import importlib
from importlib import metadata

import threefold

CORE = ["torch", "numpy", "scipy", "PyYAML", "lightning", "torchmetrics", "tqdm", "torch-geometric", "scikit-learn"]
# extra -> (distribution, import name) pairs; an extra is usable when every import works.
EXTRAS: dict[str, list[tuple[str, str]]] = {
    "lidar": [("open3d", "open3d")],
    "points": [("h5py", "h5py"), ("open3d", "open3d"), ("trimesh", "trimesh"), ("scikit-image", "skimage")],
    "medical": [("monai", "monai"), ("nibabel", "nibabel"), ("SimpleITK", "SimpleITK")],
    "mol": [("rdkit", "rdkit"), ("ase", "ase")],
    "viz": [("matplotlib", "matplotlib")],
    "scatter": [("torch-scatter", "torch_scatter")],
    "test": [("pytest", "pytest"), ("hypothesis", "hypothesis"), ("scikit-image", "skimage")],
}
SPCONV_DISTS = ["spconv", "spconv-cu102", "spconv-cu111", "spconv-cu113", "spconv-cu114", "spconv-cu116",
                "spconv-cu117", "spconv-cu118", "spconv-cu120", "spconv-cu121", "spconv-cu124", "spconv-cu126"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str | None:
    """None when importable, else the reason."""
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # noqa: BLE001 — a broken native library raises OSError etc.
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def conflicts() -> list[str]:
    """Installs that break each other: several spconv builds, or open3d beside open3d-cpu."""
    problems = []
    spconv = [d for d in SPCONV_DISTS if _version(d)]
    if len(spconv) > 1:
        problems.append(f"several spconv builds are installed ({', '.join(spconv)}); they share the module "
                        f"`spconv` — uninstall all but the one matching your torch (CPU: spconv, CUDA 12.6: spconv-cu126)")
    if _version("open3d") and _version("open3d-cpu"):
        problems.append("both open3d and open3d-cpu are installed; they share the module `open3d` — keep one")
    return problems


def doctor() -> int:
    import torch

    print(f"threefold {threefold.__version__}")
    print("core:")
    for dist in CORE:
        print(f"  {dist:<16} {_version(dist) or 'MISSING'}")
    print("extras:")
    for extra, pairs in EXTRAS.items():
        reasons = [f"{mod}: {why}" for _, mod in pairs if (why := _importable(mod))]
        state = "ok" if not reasons else "missing (" + "; ".join(reasons) + f") -> pip install 'threefold[{extra}]'"
        versions = ", ".join(f"{d} {_version(d)}" for d, _ in pairs if _version(d))
        print(f"  {extra:<8} {state}" + (f"  [{versions}]" if versions else ""))
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else ""))
    spconv = [f"{d} {_version(d)}" for d in SPCONV_DISTS if _version(d)]
    print(f"spconv build: {', '.join(spconv) if spconv else 'none (extras cpu / cu126)'}")
    problems = conflicts()
    for p in problems:
        print(f"CONFLICT: {p}")
    return 1 if problems else 0
