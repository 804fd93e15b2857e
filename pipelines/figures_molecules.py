"""Molecule and crystal figures (issue #11) for Uni-3DAR (Lu et al., "Uni-3DAR: Unified 3D
Generation and Understanding via Autoregression on Compressed Spatial Tokens", 2025):

- a grid of generated molecules as RDKit 2D depictions with a validity mark (the validity of
  :func:`threefold.science.molecule_metrics.canonical_smiles`: bonds perceived from the 3D
  coordinates, largest fragment sanitised; the valid depiction is that fragment without hydrogens,
  an invalid one shows the perceived connectivity as is);
- a grid of generated crystals (atoms in their unit cell, 3D) with validity marks;
- token-sequence length histograms of the octree encoding with and without the two-level
  compression (:meth:`threefold.science.octree.OctreeTokens.compression`).

Pure plotting, headless. RDKit comes from the ``mol`` extra and is imported inside
:func:`plot_molecule_grid`; without it the function raises
:class:`~threefold.datasets.errors.MissingExtraError` (pipelines skip that figure with a note).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError, require
from threefold.pipelines.figures import _class_colours, new_figure, save_figure

CELL_INCHES = 2.5
GRID_COLUMNS = 4
VALID_COLOUR = (0.13, 0.55, 0.13)
INVALID_COLOUR = (0.84, 0.15, 0.16)
HISTOGRAM_INCHES = (6.0, 4.0)


def _check_molecule(numbers: np.ndarray, positions: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    z, p = np.asarray(numbers), np.asarray(positions, dtype=np.float64)
    if z.ndim != 1 or p.shape != (len(z), 3):
        raise DataFormatError(f"molecule {i}: numbers {z.shape} and positions {p.shape}; expected (N,) and (N, 3)")
    if not np.isfinite(p).all():
        raise DataFormatError(f"molecule {i}: positions hold NaN or inf")
    return z.astype(np.int64), p


def depict_molecule(numbers: np.ndarray, positions: np.ndarray, size: int = 250) -> tuple[np.ndarray | None, str | None]:
    """``(image (size, size, 3|4) uint8 or None, canonical SMILES or None)`` of one generated molecule
    (atomic numbers, positions in Å). Valid: the sanitised largest fragment without H, drawn from
    its SMILES; invalid: the connectivity perceived from the coordinates, unsanitised; None when
    RDKit cannot draw it (or the molecule is empty)."""
    require("rdkit", extra="mol")
    from PIL import Image
    from rdkit import Chem
    from rdkit.Chem import Draw

    from threefold.datasets.molecule_samples import xyz_to_mol
    from threefold.science.molecule_metrics import canonical_smiles

    if len(numbers) == 0:
        return None, None
    smiles = canonical_smiles(numbers, positions)
    try:
        if smiles is not None:
            mol = Chem.MolFromSmiles(smiles)
            png = Draw.MolToImage(mol, size=(size, size))
        else:
            mol = Chem.RemoveHs(xyz_to_mol(numbers, positions), sanitize=False)
            mol.UpdatePropertyCache(strict=False)
            png = Draw.MolToImage(mol, size=(size, size), kekulize=False)
    except (ValueError, RuntimeError):
        return None, smiles
    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), smiles


def _frame(ax: Any, colour: tuple[float, float, float], title: str) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(2.5)
    ax.set_title(title, fontsize=7, color=colour, fontweight="bold")


def plot_molecule_grid(
    out: Path,
    molecules: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str] | None = None,
    max_molecules: int = 16,
    caption: str | None = None,
) -> Path:
    """The first ``max_molecules`` generated molecules, ``(numbers (N,) int, positions (N, 3) Å)``
    each (an empty molecule is an incomplete sample), as RDKit 2D depictions in a grid of four
    columns: valid ones framed green with their SMILES, invalid ones framed red. 250 px per cell."""
    mols = list(molecules)[:max_molecules]
    if not mols:
        raise DataFormatError("plot_molecule_grid: no molecules to draw")
    names = list(names)[: len(mols)] if names is not None else [f"sample {i}" for i in range(len(mols))]
    if len(names) != len(mols):
        raise ConfigError(f"plot_molecule_grid: {len(names)} names for {len(mols)} molecules")
    cols = min(GRID_COLUMNS, len(mols))
    rows = math.ceil(len(mols) / cols)
    fig = new_figure((CELL_INCHES * cols, CELL_INCHES * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    valid = 0
    for i, (ax, (numbers, positions)) in enumerate(zip(axes, mols)):
        z, p = _check_molecule(numbers, positions, i)
        image, smiles = depict_molecule(z, p)
        if image is not None:
            ax.imshow(image)
        else:
            ax.text(0.5, 0.5, "no atoms" if len(z) == 0 else "no depiction", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        if smiles is not None:
            valid += 1
            label = smiles if len(smiles) <= 32 else smiles[:29] + "..."
            _frame(ax, VALID_COLOUR, f"{names[i]}: valid\n{label}")
        else:
            _frame(ax, INVALID_COLOUR, f"{names[i]}: " + (f"invalid\n{len(z)} atoms" if len(z) else "invalid\nincomplete sample"))
    for ax in axes[len(mols):]:
        ax.set_visible(False)
    caption = caption or (f"{len(mols)} generated molecules, RDKit 2D depictions: {valid} valid (green, with their "
                          f"canonical SMILES), {len(mols) - valid} invalid (red, perceived connectivity).")
    return save_figure(fig, out, caption)


def _cell_edges(lattice: np.ndarray) -> list[np.ndarray]:
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
    xyz = corners @ lattice
    return [xyz[[a, b]] for a in range(8) for b in range(a + 1, 8) if np.abs(corners[a] - corners[b]).sum() == 1]


def plot_crystal_grid(
    out: Path,
    crystals: Sequence[Mapping[str, Any] | None],
    valid: Sequence[bool],
    max_crystals: int = 12,
    caption: str | None = None,
) -> Path:
    """Generated crystals in their unit cell: ``crystals[i]`` holds ``numbers`` (N,) int, ``frac``
    (N, 3) fractional coordinates and ``lattice`` (3, 3) Å (rows a, b, c), or is None when the
    sample has no well-formed lattice; ``valid[i]`` frames it green (valid) or red. Atoms coloured
    by element (one colour per element present in the grid); 250 px per cell, four columns."""
    items = list(crystals)[:max_crystals]
    flags = list(valid)[: len(items)]
    if not items or len(flags) != len(items):
        raise ConfigError(f"plot_crystal_grid: {len(items)} crystals and {len(flags)} validity flags")
    elements = sorted({int(z) for c in items if c is not None for z in np.asarray(c["numbers"]).tolist()})
    colours = dict(zip(elements, _class_colours(max(len(elements), 1))))
    cols = min(GRID_COLUMNS, len(items))
    rows = math.ceil(len(items) / cols)
    fig = new_figure((CELL_INCHES * cols, CELL_INCHES * rows))
    from threefold.science.vocab import ELEMENTS

    for i, (c, ok) in enumerate(zip(items, flags)):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        colour = VALID_COLOUR if ok else INVALID_COLOUR
        if c is None:
            ax.text2D(0.5, 0.5, "no lattice", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            title = f"sample {i}: invalid"
        else:
            lattice = np.asarray(c["lattice"], dtype=np.float64)
            frac = np.asarray(c["frac"], dtype=np.float64)
            numbers = np.asarray(c["numbers"], dtype=np.int64)
            if lattice.shape != (3, 3) or frac.shape != (len(numbers), 3):
                raise DataFormatError(f"crystal {i}: lattice {lattice.shape}, frac {frac.shape}; expected (3, 3), (N, 3)")
            for edge in _cell_edges(lattice):
                ax.plot(*edge.T, color=(0.4, 0.4, 0.4), linewidth=0.6)
            cart = (frac % 1.0) @ lattice
            if len(cart):
                ax.scatter(*cart.T, s=18, c=[colours[int(z)] for z in numbers], depthshade=False, edgecolors="k",
                           linewidths=0.3)
            formula = "".join(f"{ELEMENTS[z - 1]}{n if n > 1 else ''}" for z, n in zip(*np.unique(numbers, return_counts=True)))
            title = f"sample {i}: {'valid' if ok else 'invalid'}\n{formula or 'no atoms'}"
            lo, hi = np.min([e.min(0) for e in _cell_edges(lattice)], 0), np.max([e.max(0) for e in _cell_edges(lattice)], 0)
            centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
            ax.set_xlim(centre[0] - half, centre[0] + half)
            ax.set_ylim(centre[1] - half, centre[1] + half)
            ax.set_zlim(centre[2] - half, centre[2] + half)
            ax.set_box_aspect((1, 1, 1))
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, color=colour, fontweight="bold")
    n_valid = int(sum(flags))
    caption = caption or (f"{len(items)} generated crystals in their unit cell: {n_valid} valid (green titles), "
                          f"{len(items) - n_valid} invalid (red); atoms coloured by element.")
    return save_figure(fig, out, caption)


def plot_token_lengths(
    out: Path,
    lengths: Mapping[str, np.ndarray],
    xlabel: str = "tokens per structure",
    caption: str | None = None,
) -> Path:
    """Overlaid histograms of per-structure sequence lengths, one per encoding (e.g. ``{"two-level
    (Uni-3DAR)": tree_tokens, "one token per child node": child_tokens}``), on shared integer bins,
    each with a dashed line at its mean; 600 × 400 px."""
    if not lengths:
        raise ConfigError("plot_token_lengths: no length arrays")
    arrays = {k: np.asarray(v) for k, v in lengths.items()}
    for k, v in arrays.items():
        if v.ndim != 1 or v.size == 0 or not np.issubdtype(v.dtype, np.integer) or (v < 0).any():
            raise DataFormatError(f"plot_token_lengths: {k!r} has shape {v.shape}, dtype {v.dtype}; expected (B,) "
                                  "non-negative ints, B >= 1")
    lo = min(int(v.min()) for v in arrays.values())
    hi = max(int(v.max()) for v in arrays.values())
    width = max(1, math.ceil((hi - lo + 1) / 40))  # at most ~40 bins, integer-aligned
    bins = np.arange(lo, hi + width + 1, width) - 0.5
    fig = new_figure(HISTOGRAM_INCHES)
    ax = fig.subplots()
    colours = _class_colours(max(len(arrays), 2))
    for colour, (label, v) in zip(colours, arrays.items()):
        ax.hist(v, bins=bins, color=colour, alpha=0.55, label=f"{label} (mean {v.mean():.1f})")
        ax.axvline(v.mean(), color=colour, linestyle="--", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("structures")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    caption = caption or "Sequence lengths: " + "; ".join(
        f"{k}: mean {v.mean():.2f}, min {int(v.min())}, max {int(v.max())}" for k, v in arrays.items()) + "."
    return save_figure(fig, out, caption)
