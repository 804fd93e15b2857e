"""A restricted unpickler for data files that arrive as pickles (Planetoid's ``ind.<name>.*``).

``pickle.load`` executes whatever callable a file names (``os.system``, ``builtins.exec``...), so a
downloaded pickle is code, not data. :func:`safe_load_pickle` resolves every global the stream names
through an allow-list *before* anything is called; an unlisted global raises
:class:`~threefold.datasets.errors.UnsafePickleError` naming the file and the global, and the load
stops there, so the payload never runs.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from threefold.datasets.errors import DataFormatError, MissingFileError, UnsafePickleError

# The globals that the Planetoid files (kimiyoung/planetoid, Python-2 protocol 2) name, after
# Python 2 -> 3 renaming (``__builtin__`` -> ``builtins``): sparse CSR features, dense one-hot
# labels, and the adjacency ``defaultdict(list)``.
PLANETOID_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("scipy.sparse.csr", "csr_matrix"),
        ("scipy.sparse._csr", "csr_matrix"),
        ("scipy.sparse", "csr_matrix"),
        ("collections", "defaultdict"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "set"),
        ("builtins", "int"),
        ("builtins", "float"),
    }
)

# Where an allowed global lives today when the name in old files is a deprecated alias: importing
# ``numpy.core`` (numpy >= 2) or ``scipy.sparse.csr`` (scipy >= 1.8) warns or may disappear.
_CURRENT_HOME: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("numpy.core.multiarray", "_reconstruct"): (
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    ),
    ("scipy.sparse.csr", "csr_matrix"): (("scipy.sparse", "csr_matrix"),),
    ("scipy.sparse._csr", "csr_matrix"): (("scipy.sparse", "csr_matrix"),),
}


def _check_dtype_state(dtype: np.dtype, state: Any, path: Path) -> None:
    """Refuse a ``numpy.dtype`` BUILD state other than the one numpy itself pickles for a plain dtype.

    ``dtype.__setstate__`` trusts its argument: a damaged subarray entry segfaults it, and claimed
    flags (e.g. "holds object references" on an int dtype) corrupt every array of that dtype later.
    Only numeric / bool dtypes occur in the files read here, so the state must be
    ``(3, byteorder, None, None, None, elsize, alignment, flags)`` with the dtype's own sizes and flags.
    """
    ok = (
        isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
        and state[2:5] == (None, None, None) and dtype.kind in "biufc"
        and state[5] in (-1, dtype.itemsize) and state[6] in (-1, dtype.alignment) and state[7] == dtype.flags
    )  # fmt: skip
    if not ok:
        raise DataFormatError(f"{path}: pickled numpy dtype {dtype} has an invalid state {state!r:.200}")


class _AllowListUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, because its BUILD step can be checked before numpy runs it (the C
    one cannot be intercepted); its memo is a dict, so a damaged memo index allocates nothing either."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, path: Path, allowed: Collection[tuple[str, str]], encoding: str) -> None:
        super().__init__(file, encoding=encoding, fix_imports=True)
        self._path = path
        self._allowed = frozenset(allowed)
        self._nbytes = file.getbuffer().nbytes

    def load_bytearray8(self) -> None:
        # pickle's own version allocates the declared size before reading it
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size) if size <= self._nbytes else b""
        if len(data) != size:
            raise DataFormatError(f"{self._path}: a bytearray declares {size} bytes, more than the stream holds")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_build(self) -> None:
        if isinstance(self.stack[-2], np.dtype):
            _check_dtype_state(self.stack[-2], self.stack[-1], self._path)
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 pickles name e.g. ``__builtin__.list``; rename as pickle's fix_imports would (the C
        # unpickler does not expose the protocol, and the renames only map to Python-3 equivalents).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in self._allowed:
            raise UnsafePickleError(
                f"{self._path}: pickle names global {module}.{name}, which is not in the allowed list "
                f"({', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))}); refused without executing it"
            )
        for mod, attr in _CURRENT_HOME.get((module, name), ((module, name),)):
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):
                continue
        raise UnsafePickleError(f"{self._path}: allowed global {module}.{name} cannot be imported here")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: pickle uses a persistent id ({pid!r}), which is refused")


def safe_load_pickle(
    path: str | Path,
    allowed: Collection[tuple[str, str]] = PLANETOID_GLOBALS,
    encoding: str = "latin1",
) -> Any:
    """Load a pickle whose globals are all in ``allowed`` (``{(module, name), ...}``).

    ``encoding="latin1"`` reads Python-2 pickles of numpy arrays (their byte strings are ``str``).
    Raises :class:`UnsafePickleError` (file and global named) for any other global, before it is
    called; :class:`MissingFileError` if ``path`` is absent; :class:`DataFormatError` for a
    truncated or corrupt stream.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: pickle file not found")
    # Unpickling from the file's bytes: a length field that promises more bytes than the file holds
    # then reads as truncated instead of allocating what it promises.
    stream = io.BytesIO(path.read_bytes())
    try:
        return _AllowListUnpickler(stream, path, allowed, encoding).load()
    except (UnsafePickleError, DataFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, struct.error) as exc:  # what a damaged opcode stream raises, e.g. APPEND onto a str
        raise DataFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
