"""The one error family of threefold.

Every error a user can trigger with bad input derives from :class:`ThreefoldError`, so callers can
catch the family with one clause. Messages name the file (or config key), the field and what was
expected, e.g. ``DataFormatError("scan.bin: size 1001 bytes is not a multiple of 16 (float32 x,y,z,remission)")``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class ThreefoldError(Exception):
    """Base class of every error threefold raises on purpose."""


class DataFormatError(ThreefoldError, ValueError):
    """A file or array does not follow its format: wrong size, shape, dtype, NaN, label set."""


class MissingFileError(ThreefoldError, FileNotFoundError):
    """A file or folder the reader needs is absent."""


class UnsafePickleError(ThreefoldError):
    """A pickle names a global outside the allowed list, so it is refused unexecuted."""


class ConfigError(ThreefoldError, ValueError):
    """A config key is unknown, has the wrong type, or an override is malformed."""


class MissingExtraError(ThreefoldError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def require(module: str, extra: str) -> ModuleType:
    """Import an optional heavy dependency inside the function that needs it.

    >>> np = require("numpy", extra="core")
    Raises :class:`MissingExtraError` naming ``pip install 'threefold[<extra>]'`` when absent.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is required for this feature but is not importable ({exc}); "
            f"install it with: pip install 'threefold[{extra}]'"
        ) from exc
