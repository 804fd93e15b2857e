"""The one-page report of a run (issue #11): ``report.md`` and a self-contained ``report.html``.

Both are written into the run folder and show, in this order: notes (e.g. figures skipped because
matplotlib is absent), the metrics of ``metrics.json`` as tables, the exact ``config.yaml`` the run
used, and every PNG under ``figures/`` (sorted by path) with its caption (the PNG's ``Description``
chunk, see :func:`threefold.pipelines.figures.save_figure`). ``report.md`` links the figures
relatively; ``report.html`` embeds them as base64 data URIs (one file to send around), each wrapped
in a relative link to the PNG. Standard library only: a report can be written without matplotlib.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from threefold.datasets.errors import DataFormatError, MissingFileError
from threefold.pipelines.figures import FIGURES_DIR, png_caption

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"  # write_metrics stores NaN / inf as null
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def metric_tables(metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``metrics.json`` as ``(title, header, rows)`` tables: one ``key | value`` table of the scalars
    (nested dicts flattened to dotted keys, lists of scalars joined), then one table per list of
    records (e.g. ``per_seed``) with the union of the records' keys as columns."""
    scalars: list[list[str]] = []
    records: list[tuple[str, list[str], list[list[str]]]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            columns: list[str] = []
            for r in value:
                columns += [str(k) for k in r if str(k) not in columns]
            rows = [[_fmt(r[c]) if c in r else "" for c in columns] for r in value]
            records.append((prefix, columns, rows))
        else:
            scalars.append([prefix, _fmt(value)])

    walk("", metrics)
    return [("metrics", ["metric", "value"], scalars), *records] if scalars else records


def _figures(run_dir: Path) -> list[tuple[str, str]]:
    """``(relative posix path, caption)`` of every PNG under ``run_dir/figures``, sorted."""
    root = run_dir / FIGURES_DIR
    if not root.is_dir():
        return []
    found = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(run_dir).as_posix()
        found.append((rel, png_caption(png) or png.stem.replace("_", " ")))
    return found


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, notes: Sequence[str], tables, config: str | None, figures) -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Metrics", ""]
    if not tables:
        lines += ["(no metrics)", ""]
    for name, header, rows in tables:
        if name != "metrics":
            lines += [f"### {name}", ""]
        lines += ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
        lines.append("")
    lines += ["## Config", ""]
    if config is None:
        lines += ["(no config.yaml in the run folder)", ""]
    else:
        lines += ["```yaml", config.rstrip("\n"), "```", ""]
    lines += ["## Figures", ""]
    if not figures:
        lines += ["(no figures in figures/)", ""]
    for rel, caption in figures:
        alt = _md_cell(caption).replace("[", "\\[").replace("]", "\\]")
        lines += [f"![{alt}]({quote(rel)})", "", f"*{rel}*: {caption}", ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "th{background:#f2f2f2}pre{background:#f7f7f7;padding:0.8em;overflow:auto}"
    "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.9em;color:#444}"
)


def _html(title: str, notes: Sequence[str], tables, config: str | None, figures, run_dir: Path) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if notes:
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{e(n)}</li>" for n in notes], "</ul>"]
    parts.append("<h2>Metrics</h2>")
    if not tables:
        parts.append("<p>(no metrics)</p>")
    for name, header, rows in tables:
        if name != "metrics":
            parts.append(f"<h3>{e(name)}</h3>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{e(config)}</pre>" if config is not None else "<p>(no config.yaml in the run folder)</p>")
    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append("<p>(no figures in figures/)</p>")
    for rel, caption in figures:
        data = base64.b64encode((run_dir / rel).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><a href="{e(quote(rel))}"><img src="data:image/png;base64,{data}" alt="{e(caption)}"></a>'
            f"<figcaption><code>{e(rel)}</code>: {e(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``run_dir/metrics.json`` as a dict. Raises :class:`MissingFileError` when absent (the run did
    not finish) and :class:`DataFormatError` when it is not a JSON object."""
    metrics_path = Path(run_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise MissingFileError(f"{metrics_path} does not exist: not a finished run folder")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{metrics_path}: not valid JSON ({exc})") from exc
    if not isinstance(metrics, dict):
        raise DataFormatError(f"{metrics_path}: holds a {type(metrics).__name__}; expected a JSON object")
    return metrics


def write_report(run_dir: Path, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``run_dir/report.md`` and ``run_dir/report.html`` (overwriting earlier ones) from
    ``metrics.json``, ``config.yaml`` and ``figures/*.png``; returns their paths.

    ``notes``: lines shown first, e.g. why figures are missing. Raises as :func:`read_metrics`.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config = config_path.read_text() if config_path.is_file() else None
    pipeline = metrics.get("pipeline") or run_dir.parent.name
    title = f"{pipeline} — {run_dir.name}"
    tables = metric_tables(metrics)
    figures = _figures(run_dir)
    md, page = run_dir / REPORT_MD, run_dir / REPORT_HTML
    _write(md, _markdown(title, notes, tables, config, figures))
    _write(page, _html(title, notes, tables, config, figures, run_dir))
    return md, page
