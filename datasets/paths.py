"""Output paths that cannot leave their output folder.

Writers often build a file name from something a user or a data file supplies: a sample id read
from a CSV, a ``--out`` sub-path, a case name inside an archive. ``../../etc/cron.d/x``, an absolute
path or a symbolic link planted in the output folder would each make a plain ``root / name`` write
outside ``root`` (the "zip slip" class of bugs). :func:`safe_output_path` is the one place that
turns such a name into a path, and refuses every escape with an error naming the name and the root.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from threefold.datasets.errors import ConfigError


class UnsafePathError(ConfigError):
    """A user- or file-supplied output name would write outside its output folder."""


def safe_output_path(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """The absolute path of ``relative`` inside ``root``, guaranteed to stay inside ``root``.

    ``relative`` must be a non-empty relative path without ``..`` components (refused even when
    the result would stay inside, because a name that climbs is never what a writer meant), NUL
    characters or a drive / UNC prefix. Symbolic links are resolved: a link anywhere along the
    path — including the final component, dangling or not — that points outside ``root`` is refused.
    ``root`` itself may be (or lie under) a symbolic link; it is resolved first. Nothing is created.

    Returns the resolved path (``root.resolve() / relative`` with links followed).
    Raises :class:`UnsafePathError` (a :class:`~threefold.datasets.errors.ConfigError`) naming
    ``relative`` and ``root``.
    """
    text = os.fspath(relative)
    where = f"output name {text!r} under {os.fspath(root)!r}"
    if not text:
        raise UnsafePathError(f"{where}: the name is empty")
    if "\x00" in text:
        raise UnsafePathError(f"{where}: the name contains a NUL character")
    # Check both spellings: a Windows-style name ("..\\x", "C:x") is an escape on Windows and
    # refusing it everywhere keeps a run folder portable.
    for flavour in (PurePosixPath(text), PureWindowsPath(text)):
        if flavour.is_absolute() or flavour.anchor:
            raise UnsafePathError(f"{where}: expected a relative path, got an absolute one")
        if ".." in flavour.parts:
            raise UnsafePathError(f"{where}: '..' components are not allowed")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{where}: resolves to {target}, outside {base} (a symbolic link escapes the folder)")
    return target


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``write(file)`` so that readers see either the old file or the complete new
    one: a temp file in the same folder, flushed and fsynced, then renamed into place (``os.replace``
    is atomic on one file system). A failure or a kill before the rename leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
