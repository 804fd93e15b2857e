"""The shared data-loader layer: readers of real formats, sample conventions, transforms, collate
and splits. This package imports no sibling package of threefold (see ``tests/test_layering.py``)."""

from threefold.datasets.errors import (
    ConfigError,
    DataFormatError,
    MissingExtraError,
    MissingFileError,
    ThreefoldError,
    UnsafePickleError,
)
