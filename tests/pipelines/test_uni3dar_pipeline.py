"""qm9-uni3dar end to end at toy size through the CLI, checkpoint loading, and the tokenize verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from threefold.pipelines.cli import main  # noqa: E402
from threefold.pipelines.uni3dar import tokenize_command  # noqa: E402

# Ethanol written by hand in the MDL V2000 layout (counts line, atom block x y z symbol, bond block)
ETHANOL_SDF = """ethanol
  handmade

  9  8  0  0  0  0  0  0  0  0999 V2000
   -0.8883    0.1670   -0.0273 C   0  0  0  0  0  0  0  0  0  0  0  0
    0.4658   -0.5116   -0.0368 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.4311    0.3229    0.5867 O   0  0  0  0  0  0  0  0  0  0  0  0
   -0.8487    1.1175   -0.5695 H   0  0  0  0  0  0  0  0  0  0  0  0
   -1.6471   -0.4704   -0.4896 H   0  0  0  0  0  0  0  0  0  0  0  0
   -1.1964    0.3907    0.9977 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.7828   -0.7369   -1.0589 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.4200   -1.4593    0.5103 H   0  0  0  0  0  0  0  0  0  0  0  0
    1.4816    1.1533    0.0839 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  2  3  1  0
  1  4  1  0
  1  5  1  0
  1  6  1  0
  2  7  1  0
  2  8  1  0
  3  9  1  0
M  END
$$$$
"""


def _parse_sdf_atoms(text: str) -> tuple[list[str], np.ndarray]:
    lines = text.splitlines()
    n = int(lines[3][:3])
    rows = [lines[4 + i].split() for i in range(n)]
    return [r[3] for r in rows], np.array([[float(v) for v in r[:3]] for r in rows])


def test_tokenize_verb_round_trip(tmp_path):
    sdf = tmp_path / "ethanol.sdf"
    sdf.write_text(ETHANOL_SDF + ETHANOL_SDF.replace("ethanol", "ethanol-2"))
    tokens = tokenize_command(sdf, tmp_path / "tokens.json")
    data = json.loads(tokens.read_text())
    assert data["spec"] == {"cell": 0.24, "resolution": 0.01, "depth": 6} and len(data["structures"]) == 2
    assert sorted(data["structures"][0]["atoms"]) == sorted(["C", "C", "O"] + ["H"] * 6)
    out = tokenize_command(tokens, tmp_path / "decoded.xyz", decode=True)
    lines = out.read_text().splitlines()
    symbols, pos = _parse_sdf_atoms(ETHANOL_SDF)
    assert lines[0] == "9"
    got = [line.split() for line in lines[2:11]]
    assert [g[0] for g in got] == symbols  # decoded back in the input atom order
    assert np.abs(np.array([[float(v) for v in g[1:]] for g in got]) - pos).max() <= 0.005 + 1e-4


def test_qm9_uni3dar_runs_end_to_end(tmp_path):
    overrides = [
        "limit_molecules=24", "heldout_fraction=0.25", "model.d_model=32", "model.layers=1", "model.heads=2",
        "trainer.max_epochs=2", "trainer.batch_size=6", "sample.num=6", "sample.batch_size=6",
        "sample.max_items=120", "sample.keep_fraction=0.5", "trainer.accelerator=cpu",
    ]  # fmt: skip
    assert main(["run", "qm9-uni3dar", *overrides, "--runs-dir", str(tmp_path)]) == 0
    run_dir = next((tmp_path / "qm9-uni3dar").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_molecules"] == 18 and metrics["heldout_molecules"] == 6
    ce = metrics["heldout_cross_entropy"]
    for kind in ("tree", "type", "x", "y", "z"):
        assert ce[kind]["tokens"] > 0 and ce[kind]["unigram_nats"] > 0 and np.isfinite(ce[kind]["model_nats"])
    assert ce["x"]["tokens"] == ce["type"]["tokens"]  # one x per atom
    s = metrics["sampling"]
    assert s["num_sampled"] == 6 and s["filtering"] == "best 50% by atom perplexity" and "filtered" in s
    assert s["temperatures"] == {"tree": 0.9, "atom": 0.3, "xyz": 0.3}  # the reference's QM9 sampling
    assert metrics["seconds_per_step"] > 0
    assert metrics["ema_decay"] == 0.999 and metrics["evaluated_weights"] == "ema"  # the shipped config's EMA
    assert 0.0 <= s["validity"] <= 1.0 and s["molecules_per_second"] > 0
    from threefold.pipelines.uni3dar import read_xyz_frames, score_xyz_samples

    assert len(read_xyz_frames(run_dir / "samples.xyz")) == 6
    rescored = score_xyz_samples(run_dir / "samples.xyz", run_dir / "data" / "embedded_qm9_like.xyz")
    assert rescored["validity"] == pytest.approx(s["validity"]) and rescored["num_molecules"] == 6
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["model"]["d_model"] == 32
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline("qm9-uni3dar")
    sampler = pipe.load(None, run_dir / "checkpoints" / "last.ckpt")
    out = sampler.predict(num=3, seed=0, max_items=120)
    for numbers, positions in out:
        assert positions.shape == (len(numbers), 3)


def test_tokenize_verb_crystal_and_protein(tmp_path):
    pytest.importorskip("ase")
    import ase.io
    from ase.build import bulk

    cif = tmp_path / "si.cif"
    ase.io.write(cif, bulk("Si", "diamond", a=5.43, cubic=True))
    src = ase.io.read(cif)
    back = ase.io.read(tokenize_command(tokenize_command(cif, tmp_path / "t.json"), tmp_path / "si_out.cif", decode=True))
    np.testing.assert_allclose(back.cell.array, src.cell.array, atol=0.01 + 1e-6)
    frac_a = np.sort(np.round(src.get_scaled_positions() % 1.0, 3), 0)
    frac_b = np.sort(np.round(back.get_scaled_positions() % 1.0, 3), 0)
    np.testing.assert_allclose(frac_a, frac_b, atol=0.003)
    assert sorted(back.numbers.tolist()) == sorted(src.numbers.tolist())

    from threefold.datasets.proteins import ideal_alpha_helix_ca, read_pdb_ca

    ca = ideal_alpha_helix_ca(30) + 3.0
    pdb = tmp_path / "helix.pdb"
    pdb.write_text("\n".join(
        f"ATOM  {i + 1:5d}  CA  {'GLY' if i % 2 else 'ALA'} A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
        for i, (x, y, z) in enumerate(ca)) + "\nEND\n")  # fmt: skip
    decoded = tokenize_command(tokenize_command(pdb, tmp_path / "p.json"), tmp_path / "helix_out.pdb", decode=True)
    trace = read_pdb_ca(decoded)
    assert trace["residues"] == ["ALA", "GLY"] * 15
    np.testing.assert_allclose(trace["positions"], ca, atol=0.005 + 1e-3)  # PDB keeps 3 decimals


def test_geom_pickle_folder_as_data(tmp_path):
    import pickle

    from rdkit import Chem
    from rdkit.Chem import AllChem

    from threefold.pipelines.uni3dar import load_molecules

    for k, smi in enumerate(["CCO", "c1ccccc1O"]):
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(m, randomSeed=k)
        (tmp_path / f"{k}.pickle").write_bytes(pickle.dumps({"smiles": smi, "conformers": [{"rd_mol": m}] * 2}))
    mols, source = load_molecules(tmp_path, tmp_path / "run")
    assert len(mols) == 4 and source == str(tmp_path)
    assert mols[2]["numbers"].tolist() == [a.GetAtomicNum() for a in Chem.AddHs(Chem.MolFromSmiles("c1ccccc1O")).GetAtoms()]


def test_checkpoint_from_before_the_mlp_heads_loads_with_linear_heads(tmp_path):
    """A checkpoint whose hyper-parameters predate ``mlp_heads`` holds single linear heads
    (``tree_head.weight``, ``tree_head.bias``): it must load as such, not fail on the MLP layout."""
    from threefold.pipelines.uni3dar import Uni3DARModule, _module_from_checkpoint
    from threefold.science.uni3dar import Uni3DARConfig

    model = Uni3DARConfig(vocab_size=442, d_model=16, layers=1, heads=2, mlp_heads=False).to_dict()
    module = Uni3DARModule({"config": {"octree": "qm9"}, "model": model, "optim": {}})
    old_hp = {"config": {"octree": "qm9"}, "model": {k: v for k, v in model.items() if k not in ("mlp_heads", "loss_norm")},
              "optim": {}}  # fmt: skip
    assert "model.tree_head.bias" in module.state_dict()
    torch.save({"hyper_parameters": old_hp, "state_dict": module.state_dict()}, tmp_path / "old.ckpt")
    loaded = _module_from_checkpoint(tmp_path / "old.ckpt")
    assert not loaded.model.cfg.mlp_heads
    assert torch.equal(loaded.model.tree_head.weight, module.model.tree_head.weight)
