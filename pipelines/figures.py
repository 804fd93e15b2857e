"""Figures every pipeline shares (issue #11): training curves, per-class bar charts, confusion
matrices and embedding scatters, written as PNG under ``run_dir/figures/``.

Headless by construction: figures are built on :class:`matplotlib.figure.Figure` with the Agg
canvas, never through ``pyplot``, so no display, no global figure state and no backend switch is
involved. Matplotlib comes from the ``viz`` extra and is imported inside each function; without it
the functions raise :class:`~threefold.datasets.errors.MissingExtraError` and ``threefold run``
reports the figures as skipped.

A pipeline adds its field's pictures by overriding ``Pipeline.figures`` (see
``PlanetoidGCN.figures``)::

    def figures(self, cfg, run_dir, metrics):
        paths = super().figures(cfg, run_dir, metrics)         # curves + per-class bars
        out = figures_dir(run_dir)
        fig = new_figure((9.0, 3.0))                            # headless, DPI fixed
        ...draw on fig.subplots(1, 3)...
        paths.append(save_figure(fig, out / "slices_case0.png", "FLAIR with WT/TC/ET contours, case 0"))
        return paths

Every PNG carries its caption in the standard PNG text chunk ``Description`` (:func:`save_figure`,
read back by :func:`png_caption`), so the report needs no side file and a figure copied elsewhere
keeps its caption. Sizes are fixed by the inputs (no tight bounding box): at :data:`DPI` a curve
panel is 400 × 320 px, an embedding 500 × 450 px.
"""

from __future__ import annotations

import csv
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from threefold.datasets.errors import ConfigError, DataFormatError, require

FIGURES_DIR = "figures"
DPI = 100
CURVE_PANEL_INCHES = (4.0, 3.2)
CURVE_COLUMNS = 3
EMBEDDING_INCHES = (5.0, 4.5)

# Lightning logs a metric under the name given to ``self.log``; threefold's modules use
# ``train_<metric>`` / ``val_<metric>`` (or ``train/<metric>``). ``test_*`` columns hold one value
# at the end of training and belong to metrics.json, not to curves.
_SPLIT_PREFIXES = (("train", ("train_", "train/")), ("val", ("val_", "val/", "valid_", "validation_")))
_TEST_PREFIXES = ("test_", "test/")
_AXIS_COLUMNS = ("epoch", "step")
_SPLIT_STYLE = {"train": "-", "val": "--"}


def figures_dir(run_dir: Path) -> Path:
    """``run_dir/figures/``, created if absent."""
    out = Path(run_dir) / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_figure(figsize: tuple[float, float]) -> Any:
    """A headless ``matplotlib.figure.Figure`` of ``figsize`` inches at :data:`DPI` (constrained
    layout); draw on ``fig.subplots()`` and write it with :func:`save_figure`."""
    figure = require("matplotlib.figure", extra="viz")
    return figure.Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 4) RGBA: tab10 up to 10 classes, tab20 up to 20, then evenly spaced hues."""
    mpl = require("matplotlib", extra="viz")
    if num_classes <= 10:
        return np.asarray(mpl.colormaps["tab10"].colors)[:num_classes, :3]
    if num_classes <= 20:
        return np.asarray(mpl.colormaps["tab20"].colors)[:num_classes, :3]
    return mpl.colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]


def save_figure(fig: Any, path: Path, caption: str) -> Path:
    """Write a matplotlib ``Figure`` as PNG at :data:`DPI` with ``caption`` in its ``Description`` chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Description": caption})
    return path


def save_image(image: Any, path: Path, caption: str) -> Path:
    """Write a picture drawn outside matplotlib — a ``PIL.Image`` (e.g. RDKit's ``MolsToGridImage``)
    or an (H, W, 3|4) uint8 array (e.g. an offscreen render) — as PNG with ``caption``."""
    pil = require("PIL.Image", extra="viz")
    png = require("PIL.PngImagePlugin", extra="viz")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise DataFormatError(f"{path}: image array {image.shape} {image.dtype}; expected (H, W, 3|4) uint8")
        image = pil.fromarray(image)
    info = png.PngInfo()
    info.add_itxt("Description", caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def png_caption(path: Path) -> str | None:
    """The ``Description`` text chunk of a PNG (tEXt, zTXt or iTXt), or None when it has none.

    Pure standard library, so the report reads captions without matplotlib.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise DataFormatError(f"{path}: not a PNG file (signature {data[:8]!r})")
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        key, _, rest = body.partition(b"\x00")
        if key != b"Description":
            continue
        try:
            if kind == b"tEXt":
                return rest.decode("latin-1")
            if kind == b"zTXt":  # compression method byte, then zlib stream
                return zlib.decompress(rest[1:]).decode("latin-1")
            compressed = rest[0]  # iTXt: flag, method, language\0, translated keyword\0, text
            _lang, _, rest = rest[2:].partition(b"\x00")
            _translated, _, text = rest.partition(b"\x00")
            return (zlib.decompress(text) if compressed else text).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError) as exc:
            raise DataFormatError(f"{path}: corrupt {kind.decode()} Description chunk ({exc})") from None
    return None


# ---- training curves -------------------------------------------------------------------------


def read_lightning_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a Lightning ``CSVLogger`` ``metrics.csv`` as float64 arrays, NaN where a row left
    the column empty (Lightning writes one row per logging call, holding only the keys it logged)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataFormatError(f"{path}: empty file; expected a CSV header (Lightning CSVLogger metrics.csv)")
        rows = list(reader)
    columns: dict[str, list[float]] = {name: [] for name in header}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataFormatError(f"{path}:{line}: {len(row)} fields; the header has {len(header)}")
        for name, cell in zip(header, row):
            try:
                columns[name].append(float(cell) if cell != "" else math.nan)
            except ValueError:
                raise DataFormatError(f"{path}:{line}: column {name!r} holds {cell!r}; expected a number") from None
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def curve_families(columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """Group logged columns into metric families: ``{"loss": {"train": "train_loss", "val": "val_loss"}}``.

    A column without a train/val prefix forms its own family under its full name (e.g. a learning
    rate); ``test_*`` and the ``epoch``/``step`` axes are no curves. Lightning's ``_step`` / ``_epoch``
    suffixes (a metric logged both ways) become separate series (``train per step``) of one family.
    """
    families: dict[str, dict[str, str]] = {}
    for col in columns:
        if col in _AXIS_COLUMNS or col.startswith(_TEST_PREFIXES):
            continue
        split, name = "", col
        for candidate, prefixes in _SPLIT_PREFIXES:
            for prefix in prefixes:
                if col.startswith(prefix):
                    split, name = candidate, col[len(prefix) :]
                    break
            if split:
                break
        for suffix, label in (("_step", " per step"), ("_epoch", " per epoch")):
            if split and name.endswith(suffix):
                name, split = name[: -len(suffix)], split + label
        families.setdefault(name, {})[split or col] = col
    return families


def plot_training_curves(
    csv_paths: Sequence[Path], out: Path, labels: Sequence[str] | None = None, caption: str | None = None
) -> Path:
    """Training and validation curves of one or several runs (seeds, folds) against the global step.

    One panel per metric family (``loss``, ``acc``, ...), train solid and validation dashed, one
    colour per CSV. Panels are 400 × 320 px, at most three per row. Raises
    :class:`DataFormatError` when no CSV holds a plottable column.
    """
    if labels is not None and len(labels) != len(csv_paths):
        raise ConfigError(f"plot_training_curves: {len(labels)} labels for {len(csv_paths)} CSV files")
    labels = list(labels) if labels is not None else [Path(p).parent.parent.name for p in csv_paths]
    logs = [read_lightning_csv(p) for p in csv_paths]
    families: dict[str, list[tuple[int, str, str]]] = {}
    for run, cols in enumerate(logs):
        if "step" not in cols:
            raise DataFormatError(f"{csv_paths[run]}: no 'step' column; expected a Lightning CSVLogger metrics.csv")
        plottable = [c for c in cols if np.isfinite(cols[c]).any()]
        for family, series in curve_families(plottable).items():
            families.setdefault(family, []).extend((run, split, col) for split, col in series.items())
    if not families:
        raise DataFormatError(f"no train/val metrics logged in {', '.join(map(str, csv_paths))}")
    names = sorted(families)
    ncols = min(CURVE_COLUMNS, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure((CURVE_PANEL_INCHES[0] * ncols, CURVE_PANEL_INCHES[1] * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colours = _class_colours(max(len(logs), 1))
    for ax, family in zip(axes, names):
        for run, split, col in sorted(families[family], key=lambda s: (s[0], s[1])):
            y, x = logs[run][col], logs[run]["step"]
            keep = np.isfinite(y) & np.isfinite(x)
            style = _SPLIT_STYLE.get(split.split(" ")[0], ":")
            # A series logged once (e.g. validation of a 1-epoch run) is invisible as a line.
            marker = "o" if keep.sum() == 1 else None
            ax.plot(x[keep], y[keep], style, color=colours[run], marker=marker, label=f"{labels[run]} {split}".strip())
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", ncols=2 if len(families[family]) > 6 else 1)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    caption = caption or (
        f"Training (solid) and validation (dashed) curves of {', '.join(labels)}: " + ", ".join(names) + "."
    )
    return save_figure(fig, out, caption)


# ---- per-class values -------------------------------------------------------------------------


def per_class_entries(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-class values of a metrics dict, by family: keys ``"<family>/<class>"`` with a number (or
    None, written for NaN) as value, e.g. ``{"IoU/car": 0.9, "Dice/WT": 0.8}`` →
    ``{"IoU": {"car": 0.9}, "Dice": {"WT": 0.8}}``; None becomes NaN. Other keys are ignored."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" not in key or isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
            continue
        family, _, cls = key.partition("/")
        if family and cls:
            out.setdefault(family, {})[cls] = math.nan if value is None else float(value)
    return out


def plot_per_class(
    values: Mapping[str, Mapping[str, float]],
    out: Path,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    caption: str | None = None,
) -> Path:
    """Per-class table as a bar chart: one panel per family (IoU, Dice, accuracy, HD95, ...), one bar
    per class with its value written on it; NaN (undefined, e.g. a class absent from the split) is
    drawn as an empty slot labelled ``n/a``, never left out. ``errors``: optional ± bars (e.g. std
    over seeds) with the same keys. Values in [0, 1] share the axis range [0, 1.05]."""
    families = [f for f in values if len(values[f])]
    if not families:
        raise DataFormatError("plot_per_class: no per-class values to plot")
    widths = [max(4.0, 0.45 * len(values[f]) + 1.5) for f in families]
    fig = new_figure((sum(widths), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(families), squeeze=False, width_ratios=widths)).ravel()
    for ax, family in zip(axes, families):
        classes = list(values[family])
        v = np.array([values[family][c] for c in classes], dtype=np.float64)
        err = None
        if errors is not None and family in errors:
            err = np.array([errors[family].get(c, math.nan) for c in classes], dtype=np.float64)
        bars = ax.bar(np.arange(len(classes)), np.nan_to_num(v), yerr=err, color="tab:blue", capsize=3)
        ax.bar_label(bars, labels=["n/a" if np.isnan(x) else f"{x:.3f}" for x in v], fontsize="x-small")
        slanted = sum(map(len, classes)) > 30  # long or many names would overlap when level
        ax.set_xticks(np.arange(len(classes)), classes, rotation=45 if slanted else 0,
                      ha="right" if slanted else "center")
        finite = v[np.isfinite(v)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            ax.set_ylim(0, 1.05)
        ax.set_title(family)
        ax.grid(True, axis="y", alpha=0.3)
    caption = caption or "Per-class values: " + "; ".join(
        f"{f}: " + ", ".join(f"{c} " + ("n/a" if math.isnan(x) else f"{x:.3f}") for c, x in values[f].items())
        for f in families
    )
    return save_figure(fig, out, caption)


# ---- confusion matrix -------------------------------------------------------------------------


def normalized_confusion(confmat: np.ndarray, normalize: str = "true") -> np.ndarray:
    """(C, C) ``[target, pred]`` counts → float64 rates. ``"true"``: each row divided by its support
    (recall per class on the diagonal; a class without samples gives a NaN row); ``"none"``: counts."""
    conf = np.asarray(confmat, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise DataFormatError(f"confusion matrix of shape {conf.shape}; expected (C, C) [target, pred]")
    if normalize == "none":
        return conf
    if normalize != "true":
        raise ConfigError(f"normalize={normalize!r}; expected 'true' or 'none'")
    support = conf.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, conf / support, np.nan)


def plot_confusion_matrix(
    confmat: np.ndarray,
    out: Path,
    class_names: Sequence[str] | None = None,
    normalize: str = "true",
    caption: str | None = None,
) -> Path:
    """Heat map of a ``(C, C)`` ``[target, pred]`` confusion matrix (rows: ground truth), values written
    in the cells up to 20 classes; square, side ``clip(0.5 C + 2.5, 4.5, 12)`` inches."""
    rates = normalized_confusion(confmat, normalize)
    c = rates.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"plot_confusion_matrix: {len(names)} class names for a {c}×{c} matrix")
    side = min(12.0, max(4.5, 0.5 * c + 2.5))
    fig = new_figure((side, side))
    ax = fig.subplots()
    vmax = 1.0 if normalize == "true" else max(float(np.nanmax(rates)), 1.0)
    image = ax.imshow(np.ma.masked_invalid(rates), cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8)
    slanted = sum(map(len, names)) > 30  # long or many names would overlap when level
    ax.set_xticks(np.arange(c), names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(np.arange(c), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if c <= 20:
        for (i, j), value in np.ndenumerate(rates):
            text = "n/a" if np.isnan(value) else (f"{value:.2f}" if normalize == "true" else f"{value:.0f}")
            dark = np.isfinite(value) and value > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color="white" if dark else "black")
    caption = caption or (
        "Confusion matrix (rows: ground truth, columns: prediction"
        + (", each row divided by its number of samples)." if normalize == "true" else ", counts).")
    )
    return save_figure(fig, out, caption)


# ---- embeddings -------------------------------------------------------------------------------


def project_embedding(embedding: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) float embedding → (N, 2) float64 coordinates for a scatter.

    ``"pca"``: the first two principal components (scikit-learn ``PCA``, exact SVD, deterministic up
    to sign). ``"tsne"``: scikit-learn ``TSNE`` (van der Maaten & Hinton 2008) with PCA
    initialisation, ``random_state=seed`` and perplexity ``min(30, (N - 1) / 3)`` (it must stay below N).
    """
    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2:
        raise DataFormatError(f"embedding of shape {x.shape}; expected (N, D) with N >= 3 nodes and D >= 2")
    if not np.isfinite(x).all():
        raise DataFormatError("embedding holds NaN or inf values")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, svd_solver="full").fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (x.shape[0] - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ConfigError(f"embedding method {method!r}; expected 'pca' or 'tsne'")


def plot_embedding(
    embedding: np.ndarray,
    labels: np.ndarray,
    out: Path,
    method: str = "pca",
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    caption: str | None = None,
) -> Path:
    """Scatter of an (N, D) node/graph embedding projected to 2-D (:func:`project_embedding`),
    coloured by the (N,) int class labels (tab10 colours for up to 10 classes); 500 × 450 px."""
    y = np.asarray(labels)
    if y.shape != (np.asarray(embedding).shape[0],) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataFormatError(
            f"labels of shape {y.shape}, dtype {y.dtype}; expected (N,) non-negative ints, N = embedding rows"
        )
    xy = project_embedding(embedding, method, seed)
    num_classes = int(y.max()) + 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise ConfigError(f"plot_embedding: {len(names)} class names for labels up to {num_classes - 1}")
    lines = require("matplotlib.lines", extra="viz")
    colours = _class_colours(num_classes)
    fig = new_figure(EMBEDDING_INCHES)
    ax = fig.subplots()
    # One call in a seeded random order: drawn class by class, the last class would hide the others.
    order = np.random.default_rng(seed).permutation(len(y))
    size = float(np.clip(600.0 / np.sqrt(len(y)), 4.0, 30.0))  # smaller markers for more points
    ax.scatter(xy[order, 0], xy[order, 1], s=size, c=colours[y[order]], edgecolors="none")
    handles = [
        lines.Line2D([], [], marker="o", linestyle="", color=colours[c], label=names[c])
        for c in range(num_classes)
        if (y == c).any()
    ]
    axis = "PC" if method == "pca" else "t-SNE "
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.legend(handles=handles, fontsize="x-small", loc="best")
    name = "PCA" if method == "pca" else "t-SNE"
    caption = caption or f"{name} of the embedding ({xy.shape[0]} points), coloured by class."
    return save_figure(fig, out, caption)


# ---- defaults for every pipeline ---------------------------------------------------------------


def lightning_logs(run_dir: Path) -> list[tuple[str, Path]]:
    """``(label, metrics.csv)`` for every Lightning CSV log under ``run_dir`` (one per seed / fold /
    stage), sorted by path; the label is the sub-run folder (``seed0``) or ``run`` at the top."""
    run_dir = Path(run_dir)
    found = []
    for csv_path in sorted(run_dir.glob("**/logs/metrics.csv")):
        sub = csv_path.parent.parent.relative_to(run_dir)
        found.append(("run" if sub == Path(".") else sub.as_posix(), csv_path))
    return found


def _has_curves(csv_path: Path) -> bool:
    cols = read_lightning_csv(csv_path)
    return bool(curve_families([c for c, v in cols.items() if np.isfinite(v).any()]))


def default_figures(run_dir: Path, metrics: Mapping[str, Any]) -> list[Path]:
    """What every pipeline gets: ``figures/curves.png`` when Lightning logged train/val metrics, and
    ``figures/per_class.png`` when ``metrics`` holds ``"<family>/<class>"`` entries."""
    out = figures_dir(run_dir)
    paths = []
    logs = [(label, p) for label, p in lightning_logs(run_dir) if _has_curves(p)]
    if logs:
        paths.append(plot_training_curves([p for _, p in logs], out / "curves.png", labels=[l for l, _ in logs]))
    per_class = per_class_entries(metrics)
    if per_class:
        paths.append(plot_per_class(per_class, out / "per_class.png"))
    return paths
