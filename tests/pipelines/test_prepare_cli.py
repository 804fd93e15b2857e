"""``threefold prepare DATASET [--workers N] [--shard i/n]`` (issue #12 §2): a run killed half-way
and rerun gives the uninterrupted run's cache without recomputing what was finished; 2 workers and
n shards give the same bytes as 1 worker; the brats and qm9 steps cache what their pipelines read,
checked against brute-force NumPy and the tokenizer's exact inverse; bad input is a clear error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from threefold.pipelines.cli import main


def _entries(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.entry"))}


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "threefold.pipelines.cli", "prepare", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    pytest.importorskip("open3d")
    from threefold.datasets.lidar_synthetic import generate_lidar_sample

    # 8 labelled scans of ~47k points: 16 entries (R- and C-RAPiD), about 0.1 s each on one core
    return generate_lidar_sample(tmp_path_factory.mktemp("kitti"), sequences=("00", "08"), scans_per_sequence=4,
                                 azimuth_step_deg=0.4)


@pytest.fixture(scope="module")
def kitti_reference(kitti, tmp_path_factory):
    out = tmp_path_factory.mktemp("kitti-ref")
    assert main(["prepare", "semantickitti", "--data", str(kitti), "--out", str(out), "--workers", "1"]) == 0
    entries = _entries(out)
    assert len(entries) == 16
    return entries


@pytest.mark.slow  # two subprocess runs (~7 s) plus the shared fixtures
def test_resume_after_kill(kitti, kitti_reference, tmp_path):
    out = tmp_path / "cache"
    proc = _cli("semantickitti", "--data", str(kitti), "--out", str(out), "--workers", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        n = len(list(out.rglob("*.entry"))) if out.exists() else 0
        if 2 <= n < 15:  # some, not all of 16: kill it half-way
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed half-way"
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("*.entry")}
    assert 0 < len(finished) < len(kitti_reference)

    rerun = _cli("semantickitti", "--data", str(kitti), "--out", str(out), "--workers", "2")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    m = re.search(r"(\d+) computed, (\d+) skipped", stdout)
    assert m and (int(m[1]), int(m[2])) == (len(kitti_reference) - len(finished), len(finished)), stdout
    assert _entries(out) == kitti_reference  # same keys, same bytes as the uninterrupted run
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished entries not rewritten


def test_workers_and_shards_give_the_same_bytes(kitti, kitti_reference, tmp_path):
    out = tmp_path / "sharded"
    for i, workers in enumerate(("2", "1", "1")):  # three "machines" sharing one cache folder
        assert main(["prepare", "semantickitti", "--data", str(kitti), "--out", str(out), "--workers", workers,
                     "--shard", f"{i}/3"]) == 0
    assert _entries(out) == kitti_reference


def test_bad_input(kitti, tmp_path, capsys):
    out = str(tmp_path / "c")
    for shard in ("3/3", "x", "-1/2", "0/0"):
        assert main(["prepare", "semantickitti", "--data", str(kitti), "--out", out, "--shard", shard]) == 2
        assert "--shard" in capsys.readouterr().err
    assert main(["prepare", "semantickitti", "--data", str(kitti), "--out", out, "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    for dataset in ("semantickitti", "brats", "qm9"):
        assert main(["prepare", dataset, "--data", str(missing), "--out", out]) == 1
        assert f"--data {missing} does not exist" in capsys.readouterr().err
    assert main(["prepare", "qm9", "--data", str(tmp_path), "--out", out]) == 1  # a folder without QM9 files
    assert "no dsgdb9nsd_*.xyz files" in capsys.readouterr().err
    assert main(["prepare", "planetoid", "--data", str(tmp_path), "--out", out]) == 2
    assert "needs no `prepare` step" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --- brats ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    pytest.importorskip("nibabel")
    from threefold.datasets.brain_phantoms import write_brats2018_phantoms

    root = tmp_path_factory.mktemp("brats")
    write_brats2018_phantoms(root, 5, seed=0, shape=(24, 24, 24))
    return root


def test_brats_prepare(brats, tmp_path, monkeypatch):
    import threefold.datasets.brats_prepare as bp
    from threefold.datasets.brats import BraTS, list_cases, read_case
    from threefold.pipelines.brats import BratsConfig, BratsDataModule, PreprocessedCases
    from threefold.pipelines.config import resolve_config

    one, two = tmp_path / "w1", tmp_path / "w2"
    assert main(["prepare", "brats", "--data", str(brats), "--out", str(one), "--workers", "1"]) == 0
    assert main(["prepare", "brats", "--data", str(brats), "--out", str(two), "--workers", "2"]) == 0
    assert len(_entries(one)) == 5 and _entries(one) == _entries(two)

    # brute-force reference of one case: box of voxels non-zero in any modality, z-score inside it
    case = list_cases(brats)[1]
    raw = read_case(case)
    nz = np.argwhere(np.any(raw["image"] != 0, axis=0))
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = raw["image"][:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64)
    brain = np.any(crop != 0, axis=0)
    expect = np.zeros_like(crop)
    for c in range(4):
        v = crop[c][brain]
        expect[c][brain] = (v - v.mean()) / v.std()

    def no_read(*args, **kwargs):
        raise AssertionError("the pipeline re-read a case that prepare had cached")

    monkeypatch.setattr(bp, "read_case", no_read)
    cached = bp.preprocessed_case(case, one)
    np.testing.assert_allclose(cached["image"], expect, atol=1e-5)
    np.testing.assert_array_equal(cached["label"], raw["label"][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    np.testing.assert_array_equal(cached["bbox"], np.stack([lo, hi], 1))
    assert cached["shape"] == raw["shape"] and cached["case"] == case.name and cached["layout"] == "brats2018"

    # the pipeline's data hook (cache_dir) reads the entries: equal, array for array, to on-the-fly preprocessing
    import threefold.datasets.brats as brats_module

    monkeypatch.undo()
    ds = BraTS(brats, "all")
    direct = [PreprocessedCases(ds, cache=False)[i] for i in range(len(ds))]
    monkeypatch.setattr(bp, "read_case", no_read)
    monkeypatch.setattr(brats_module, "read_case", no_read)  # any read of a case file now fails
    from_cache = PreprocessedCases(ds, cache=False, cache_dir=str(one))
    for i, b in enumerate(direct):
        a = from_cache[i]
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
            assert type(a[k]) is type(b[k]) and np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
    # `cache_dir=CACHE` on the command line reaches the pipeline's data module
    cfg = resolve_config(BratsConfig, "brats-multilevel", overrides=[f"cache_dir={one}"])
    dm = BratsDataModule(brats, cfg)
    assert len(dm.train_cases) == 4 and dm.train_cases[0]["image"].dtype == np.float32
    with pytest.raises(AssertionError, match="re-read"):  # without it, the case files are read
        BratsDataModule(brats, resolve_config(BratsConfig, "brats-multilevel")).train_cases[0]


# --- qm9 ------------------------------------------------------------------------------------------------------


def _write_qm9(root: Path, mols: list[dict]) -> Path:
    """QM9 originals from the published layout (Ramakrishnan et al. 2014, Table 2)."""
    symbols = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
    props = "\t".join(["0.5"] * 15)
    for i, m in enumerate(mols, start=1):
        atoms = [f"{symbols[int(z)]}\t{x:.10f}\t{y:.10f}\t{w:.10f}\t0.0"
                 for z, (x, y, w) in zip(m["numbers"], np.asarray(m["positions"], np.float64))]
        text = "\n".join([str(len(atoms)), f"gdb {i}\t{props}\t", *atoms, "100.0\t200.0", "C\tC", "InChI=1S\tInChI=1S"])
        (root / f"dsgdb9nsd_{i:06d}.xyz").write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def qm9(tmp_path_factory):
    from threefold.datasets.molecule_samples import embedded_molecules

    mols = [m for m in embedded_molecules() if set(np.asarray(m["numbers"]).tolist()) <= {1, 6, 7, 8, 9}][:120]
    return _write_qm9(tmp_path_factory.mktemp("qm9"), mols)


def test_qm9_prepare(qm9, tmp_path):
    from threefold.datasets.qm9 import read_qm9_folder
    from threefold.science.octree import OctreeTokenizer, detokenize
    from threefold.science.qm9_tokens import load_prepared_qm9, prepare_qm9_tokens, take_structures

    one, two = tmp_path / "w1", tmp_path / "w2"
    c1 = prepare_qm9_tokens(qm9, one, workers=1, progress=False, shard_size=25)
    c2 = prepare_qm9_tokens(qm9, two, workers=2, progress=False, shard_size=25)
    assert (c2["items"], c2["computed"], c2["skipped"]) == (5, 5, 0)
    assert (c1["molecules"], c1["items"], c1["computed"]) == (120, 5, 5)  # 4 x 25 + 20: shards of molecules
    assert _entries(one) == _entries(two) and len(_entries(one)) == 5
    again = prepare_qm9_tokens(qm9, one, workers=2, progress=False, shard_size=25)
    assert (again["computed"], again["skipped"]) == (0, 5)

    mols, tokens = load_prepared_qm9(qm9, one, shard_size=25)
    ref = read_qm9_folder(qm9)
    assert len(mols) == len(tokens) == 120
    tok = OctreeTokenizer("qm9")
    types, pos, _ = detokenize(tokens)  # the exact inverse: within half a 0.01 Å bin of the file's coordinates
    for b in (0, 37, 119):
        np.testing.assert_array_equal(mols[b]["numbers"], ref[b]["numbers"])
        np.testing.assert_array_equal(mols[b]["positions"], ref[b]["positions"])
        a0, a1 = tokens.atom_ptr[b], tokens.atom_ptr[b + 1]
        back = a0 + np.argsort(tokens.atom_index[a0:a1])
        np.testing.assert_array_equal(tok.vocab.atomic_numbers(types[back]), ref[b]["numbers"])
        assert np.abs(pos[back] - ref[b]["positions"]).max() <= 0.005 + 1e-6
    # take_structures gathers exactly what tokenizing those molecules alone gives
    pick = [5, 90, 0, 31]
    direct = tok.tokenize_batch(np.concatenate([ref[i]["numbers"] for i in pick]),
                                np.concatenate([ref[i]["positions"] for i in pick]).astype(np.float64),
                                np.array([len(ref[i]["numbers"]) for i in pick]))
    got = take_structures(tokens, pick)
    for name in ("tree", "tree_level", "tree_cell", "tree_ptr", "atom_type", "atom_xyz", "atom_cell", "atom_ptr",
                 "atom_index", "origin"):
        np.testing.assert_array_equal(getattr(got, name), getattr(direct, name), err_msg=name)
    short, short_tokens = load_prepared_qm9(qm9, one, limit=30, shard_size=25)
    assert len(short) == len(short_tokens) == 30 and short_tokens.atom_ptr[-1] == tokens.atom_ptr[30]


def test_qm9_pipeline_collate_reads_the_cache(qm9, tmp_path, monkeypatch):
    import threefold.datasets.qm9 as qm9_module
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.uni3dar import (AugmentSection, CachedTokenCollate, TokenCollate, Uni3DARRunConfig,
                                             _prepared, load_molecules)
    from threefold.science.octree import OctreeTokenizer
    from threefold.science.qm9_tokens import load_prepared_qm9, prepare_qm9_tokens

    assert main(["prepare", "qm9", "--data", str(qm9), "--out", str(tmp_path), "--workers", "1"]) == 0
    parsed, _ = load_molecules(qm9, tmp_path)

    def no_parse(*args, **kwargs):
        raise AssertionError("the pipeline parsed a QM9 file that prepare had cached")

    monkeypatch.setattr(qm9_module, "read_qm9_xyz", no_parse)
    cfg = resolve_config(Uni3DARRunConfig, "qm9-uni3dar", overrides=[f"token_cache={tmp_path}"])
    mols, _, collate_cls = _prepared(cfg, qm9)  # the pipeline's data hook
    assert len(mols) == len(parsed) == 120
    for m, p in zip(mols, parsed):
        np.testing.assert_array_equal(m["numbers"], p["numbers"])
        np.testing.assert_array_equal(m["positions"], p["positions"])
    _, tokens = load_prepared_qm9(qm9, tmp_path)
    tok = OctreeTokenizer("qm9")
    off = AugmentSection(rotate=False, translation_sigma=0.0, shift_cells=0, level1_delete=0.0)
    cached = collate_cls(mols, tok, off, 0)
    assert cached.use_cache
    plain = TokenCollate(mols, tok, off, 0)
    batch = [3, 77, 12, 101]
    a, b = cached(batch), plain(batch)
    for name in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy(), err_msg=name)
    # augmented batches are tokenized after their random motion, as without the cache
    on = CachedTokenCollate(mols, tok, AugmentSection(), 0, cached=tokens)
    assert not on.use_cache
    np.testing.assert_array_equal(on(batch).tokens.numpy(), TokenCollate(mols, tok, AugmentSection(), 0)(batch).tokens.numpy())
    # one shard of SHARD_SIZE molecules: already prepared by the CLI, nothing recomputed
    assert prepare_qm9_tokens(qm9, tmp_path, workers=1, progress=False)["skipped"] == 1
