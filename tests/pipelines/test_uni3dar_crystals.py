"""mp20-uni3dar end to end at toy size, and the crystal decoder on tokenizer output."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ase")

from threefold.pipelines.cli import main  # noqa: E402
from threefold.pipelines.uni3dar_crystals import CrystalCollate, decode_crystal, embedded_crystals  # noqa: E402
from threefold.science.octree import OctreeTokenizer, detokenize  # noqa: E402


def test_decode_crystal_inverts_the_tokenizer():
    tok = OctreeTokenizer("mp20")
    for c in embedded_crystals()[::9]:
        t = tok.tokenize_crystal(c["numbers"], c["positions"], c["lattice"])
        lt, lp, _ = detokenize(t.lattice)
        at, ap, _ = detokenize(t.atoms)
        out = decode_crystal(np.concatenate([lt, at]), np.concatenate([lp, ap]),
                             np.r_[np.zeros(8, int), np.ones(len(at), int)], tok.vocab)  # fmt: skip
        np.testing.assert_allclose(out["lattice"], c["lattice"], atol=0.0101)
        frac_in = (np.asarray(c["positions"], np.float64) @ np.linalg.inv(np.asarray(c["lattice"], np.float64))) % 1
        d = (out["frac"] - frac_in[t.atoms.atom_index] + 0.5) % 1.0 - 0.5
        assert np.abs(d @ out["lattice"]).max() < 0.02
    assert decode_crystal(np.array([tok.vocab.lattice_offset] * 8), np.zeros((8, 3)), np.zeros(8, int), tok.vocab) is None


def test_crystal_collate_predicts_every_corner_and_atom():
    tok = OctreeTokenizer("mp20")
    crystals = embedded_crystals()
    from threefold.pipelines.uni3dar import AugmentSection

    batch = CrystalCollate(crystals, tok, AugmentSection(), seed=0)([0, 5, 60])
    assert batch.tree_index.max() == 1 and int((batch.kind == 2).sum()) == 3 * 8 + sum(
        len(crystals[i]["numbers"]) for i in (0, 5, 60)
    )


def test_mp20_uni3dar_runs_end_to_end(tmp_path):
    overrides = ["model.d_model=32", "model.layers=1", "model.heads=2", "trainer.max_epochs=1", "trainer.batch_size=16",
                 "sample.num=4", "sample.batch_size=4", "sample.max_items=300", "trainer.accelerator=cpu",
                 "limit_molecules=20", "sample.keep_fraction=0.5"]  # fmt: skip
    assert main(["run", "mp20-uni3dar", *overrides, "--runs-dir", str(tmp_path)]) == 0
    run_dir = next((tmp_path / "mp20-uni3dar").iterdir())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_crystals"] == 18 and m["heldout_crystals"] == 2
    held = np.random.default_rng(0).permutation(20)[:2]  # the pipeline's seeded split
    atoms = sum(len(embedded_crystals()[i]["numbers"]) for i in held)
    assert m["heldout_cross_entropy"]["type"]["tokens"] == 2 * 8 + atoms  # corners + atoms
    s = m["sampling"]
    assert s["num_sampled"] == 4 and 0 <= s["valid"] <= 1 and s["filtering"] == "best 50% by atom perplexity"
    assert s["filtered"]["num_kept"] <= 2
    assert len(json.loads((run_dir / "samples.json").read_text())) == 4
    assert len(list((run_dir / "data").glob("*.cif"))) == 68
