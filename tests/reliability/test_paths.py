"""Output-path safety (issue #10 §1): a user- or file-supplied name never leads a writer out of its
output folder — not by ``..``, an absolute path, a drive prefix, nor a planted symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threefold.datasets.errors import ConfigError, ThreefoldError
from threefold.datasets.paths import UnsafePathError, safe_output_path

EXAMPLES = int(os.environ.get("THREEFOLD_FUZZ_EXAMPLES", "25"))


@pytest.mark.parametrize("name", ["a.nii.gz", "case_001/seg.nii.gz", "./x/./y.txt", "deep/er/than/that.npy"])
def test_names_inside_the_root_are_returned_resolved(tmp_path, name):
    out = safe_output_path(tmp_path, name)
    assert out == (tmp_path.resolve() / name).resolve()
    assert out.is_relative_to(tmp_path.resolve())
    assert not out.exists()  # nothing is created


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/..", "..", "/etc/passwd", "//server/share/x",
                                  "..\\x", "C:\\x", "C:x", "\\\\server\\share", "", "a\x00b"])
def test_escapes_are_refused_naming_the_path(tmp_path, name):
    with pytest.raises(UnsafePathError) as info:
        safe_output_path(tmp_path, name)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ThreefoldError)
    assert repr(name) in str(info.value) and str(tmp_path) in str(info.value)


def test_symlink_escapes_are_refused(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (root / "dir_link").symlink_to(outside, target_is_directory=True)
    (root / "file_link").symlink_to(outside / "victim.txt")  # dangling: writing would create it outside
    (root / "inner").mkdir()
    (root / "ok_link").symlink_to(root / "inner", target_is_directory=True)
    for name in ("dir_link/x.txt", "file_link", "dir_link"):
        with pytest.raises(UnsafePathError, match="outside"):
            safe_output_path(root, name)
    assert safe_output_path(root, "ok_link/x.txt") == (root / "inner" / "x.txt").resolve()


def test_a_symlinked_root_is_allowed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert safe_output_path(tmp_path / "alias", "f.txt") == real.resolve() / "f.txt"


@settings(max_examples=EXAMPLES * 4, derandomize=True, database=None, deadline=None)
@given(parts=st.lists(st.sampled_from(["a", "b", ".", "..", "", "/", "\\", "c:", "~", "x y"]), min_size=1, max_size=6))
def test_fuzzed_names_either_stay_inside_or_raise(tmp_path_factory, parts):
    root = tmp_path_factory.getbasetemp() / "fuzzroot"
    root.mkdir(exist_ok=True)
    name = "/".join(parts)
    try:
        out = safe_output_path(root, name)
    except UnsafePathError:
        return
    # independent check with os.path on the lexical path (no links exist under this root)
    joined = os.path.normpath(os.path.join(os.fspath(root.resolve()), name))
    assert os.path.commonpath([joined, os.fspath(root.resolve())]) == os.fspath(root.resolve())
    assert os.fspath(out) == joined
