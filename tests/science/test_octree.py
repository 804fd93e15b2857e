"""Uni-3DAR octree tokenizer: occupancy masks against a dense brute-force octree, exact round trips
under random rigid motions on real molecules / crystals / a protein Cα trace, collisions, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError
from threefold.science.octree import (
    PRESETS,
    CollisionError,
    OctreeSpec,
    OctreeTokenizer,
    decode_tree,
    detokenize,
    tokenize,
    tokenize_batch,
)

HALF_BIN = 0.005 + 1e-9  # Å, half of the 0.01 Å coordinate bin (plus float64 rounding)


# --- independent reference: a dense occupancy grid pooled 2x2x2 per level --------------------------------------


def _morton_slow(cell: tuple[int, int, int], bits: int) -> int:
    code = 0
    for b in range(bits):
        for axis in range(3):
            code |= ((cell[axis] >> b) & 1) << (3 * b + axis)
    return code


def dense_octree_tokens(cells: np.ndarray, depth: int) -> list[int]:
    """Tree tokens of the octree over ``cells`` (N, 3), from a dense grid: breadth-first, Morton per level."""
    n = 2**depth
    occ = np.zeros((n, n, n), bool)
    occ[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    grids = [occ]
    for _ in range(depth):
        g = grids[-1]
        m = g.shape[0] // 2
        grids.append(g.reshape(m, 2, m, 2, m, 2).any(axis=(1, 3, 5)))
    tokens = []
    for level in range(depth, 0, -1):
        parent, child = grids[level], grids[level - 1]
        nodes = sorted(map(tuple, np.argwhere(parent)), key=lambda c: _morton_slow(c, depth))
        for x, y, z in nodes:
            mask = 0
            for i in range(8):  # child i: x fastest, then y, then z
                dx, dy, dz = i & 1, (i >> 1) & 1, (i >> 2) & 1
                mask |= int(child[2 * x + dx, 2 * y + dy, 2 * z + dz]) << i
            tokens.append(mask)
    return tokens


def _pinned(cells: np.ndarray, spec: OctreeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Positions at the centres of ``cells`` and the centre that pins the box corner at the origin."""
    pos = (cells + 0.5) * spec.cell
    return pos, np.full((1, 3), spec.box / 2)


def test_hand_built_occupancy_masks():
    spec = OctreeSpec(cell=1.0, resolution=0.25, depth=2)
    cells = np.array([[0, 0, 0], [3, 0, 0]])
    pos, center = _pinned(cells, spec)
    t = tokenize(np.array([6, 8]), pos, spec, center=center)
    # root: children (0,0,0) -> bit 0, (1,0,0) -> bit 1; level 1: cell (0,0,0) in node (0,0,0) -> bit 0,
    # cell (3,0,0) in node (2,0,0) at offset (1,0,0) -> bit 1
    assert t.tree.tolist() == [0b11, 0b01, 0b10]
    assert t.tree_level.tolist() == [2, 1, 1]
    assert t.atom_type.tolist() == [6, 8]

    cells = np.array([[3, 3, 3], [0, 1, 2]])  # given out of Morton order
    pos, center = _pinned(cells, spec)
    t = tokenize(np.array([1, 7]), pos, spec, center=center)
    # (0,1,2): root child (0,0,1) -> bit 4; in node (0,0,2) offset (0,1,0) -> bit 2
    # (3,3,3): root child (1,1,1) -> bit 7; in node (2,2,2) offset (1,1,1) -> bit 7
    assert t.tree.tolist() == [(1 << 4) | (1 << 7), 1 << 2, 1 << 7]
    assert t.atom_type.tolist() == [7, 1] and t.atom_index.tolist() == [1, 0]
    assert t.atom_xyz.tolist() == [[2, 2, 2], [2, 2, 2]]  # cell centre = bin 2 of 4


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_masks_match_dense_octree(depth):
    rng = np.random.default_rng(depth)
    spec = OctreeSpec(cell=0.24, resolution=0.01, depth=depth)
    for _ in range(20):
        n = int(rng.integers(1, min(40, 8**depth) + 1))
        flat = rng.choice(8**depth, size=n, replace=False)
        cells = np.stack(np.unravel_index(flat, (2**depth,) * 3), 1)
        pos, center = _pinned(cells, spec)
        pos = pos + rng.uniform(-0.1, 0.1, pos.shape)  # stay inside the cell
        t = tokenize(np.ones(n, np.int64), pos, spec, center=center)
        assert t.tree.tolist() == dense_octree_tokens(cells, depth)
        comp = t.compression()
        assert comp["child_tokens"][0] == sum(bin(v).count("1") for v in t.tree.tolist())


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 12, 30)
    pos = np.concatenate([rng.choice(512, c, replace=False)[:, None] // np.array([1, 8, 64]) % 8 * 0.7 for c in counts])
    pos = pos + rng.uniform(0, 0.2, pos.shape)
    types = rng.integers(1, 10, len(pos))
    batch = tokenize_batch(types, pos, counts)
    start = np.concatenate([[0], np.cumsum(counts)])
    for b in range(len(counts)):
        one = tokenize(types[start[b] : start[b + 1]], pos[start[b] : start[b + 1]])
        got = batch[b]
        for field in ("tree", "tree_level", "tree_cell", "atom_type", "atom_xyz", "atom_index", "origin"):
            np.testing.assert_array_equal(getattr(got, field), getattr(one, field))


# --- round trips on real structures ---------------------------------------------------------------------------


def _rdkit_dir() -> Path:
    rdkit = pytest.importorskip("rdkit")
    return Path(rdkit.__file__).parent


SDF_SETS = {  # the 3D ligand sets shipped in the RDKit wheel, all with explicit hydrogens
    "EGFR": "Contrib/PBF/testData/egfr.sdf",
    "CDK2": "Contrib/Fastcluster/testdata/cdk2.sdf",
    "c-Met": "Contrib/FreeWilson/data/cmet_ligands.sdf",
}


def _sdf_molecules() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from rdkit import Chem

    out = []
    for name, rel in SDF_SETS.items():
        for i, m in enumerate(Chem.SDMolSupplier(str(_rdkit_dir() / rel), removeHs=False, sanitize=False)):
            assert m is not None
            z = np.array([a.GetAtomicNum() for a in m.GetAtoms()])
            out.append((f"{name}#{i}", z, m.GetConformer().GetPositions()))
    return out


def _nci_etkdg_molecules(n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """ETKDG conformers (with H, seed 42) of the first ``n`` embeddable NCI SMILES (<= 12 heavy atoms)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    out = []
    for line in (_rdkit_dir() / "Data/NCI/first_5K.smi").read_text().splitlines():
        smi = line.split()[0]
        m = Chem.MolFromSmiles(smi)
        if m is None or m.GetNumHeavyAtoms() > 12 or len(Chem.GetMolFrags(m)) > 1:
            continue
        m = Chem.AddHs(m)
        params = AllChem.ETKDGv3()
        params.randomSeed = 42
        params.maxIterations = 50
        if AllChem.EmbedMolecule(m, params) != 0:
            continue
        out.append((f"NCI:{smi}", np.array([a.GetAtomicNum() for a in m.GetAtoms()]), m.GetConformer().GetPositions()))
        if len(out) == n:
            break
    return out


def _rotation(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix()


def test_round_trip_1000_molecules_under_rigid_motions():
    sdf = _sdf_molecules()
    nci = _nci_etkdg_molecules(600)
    assert len(sdf) == 436 and len(nci) == 600  # 365 EGFR + 47 CDK2 + 24 c-Met, and 600 NCI conformers
    mols = sdf + nci
    assert sum(int((z == 1).sum() > 0) for _, z, _ in mols) >= 1000
    rng = np.random.default_rng(7)
    tok = OctreeTokenizer("drug")  # 30.72 Å box: the ligands reach 21.5 Å
    moved, rots, shifts = [], [], []
    for _, _, pos in mols:
        r, t = _rotation(rng), rng.uniform(-50, 50, 3)
        moved.append(pos @ r.T + t)
        rots.append(r)
        shifts.append(t)
    counts = np.array([len(z) for _, z, _ in mols])
    z_all = np.concatenate([z for _, z, _ in mols])
    moved_all = np.concatenate(moved)
    tokens = tok.tokenize_batch(z_all, moved_all, counts, names=[n for n, _, _ in mols])
    z_dec, p_dec = tok.detokenize(tokens)
    start = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    src = start + tokens.atom_index
    assert np.array_equal(np.sort(src), np.arange(len(z_all)))  # a bijection onto the input atoms
    np.testing.assert_array_equal(z_dec, z_all[src])
    assert np.abs(p_dec - moved_all[src]).max() <= HALF_BIN  # per axis, in the tokenized frame
    # undo the motion: Euclidean error is bounded by half a bin's diagonal
    mol = np.repeat(np.arange(len(mols)), counts)
    undone = np.einsum("nji,nj->ni", np.stack(rots)[mol], p_dec - np.stack(shifts)[mol])
    orig = np.concatenate([p for _, _, p in mols])[src]
    assert np.linalg.norm(undone - orig, axis=1).max() <= HALF_BIN * np.sqrt(3)
    # and the positions are recovered as a set, without the index map (nearest-neighbour match)
    from scipy.spatial import cKDTree

    for b in rng.choice(len(mols), 50, replace=False):
        a0, a1 = tokens.atom_ptr[b], tokens.atom_ptr[b + 1]
        d, j = cKDTree(moved[b]).query(p_dec[a0:a1])
        assert d.max() <= HALF_BIN * np.sqrt(3) and len(set(j.tolist())) == a1 - a0
    comp = tokens.compression()
    assert (comp["child_tokens"] > comp["tree_tokens"]).all()


def _ase_crystals() -> list[tuple[str, object]]:
    ase_io = pytest.importorskip("ase.io")
    import ase

    cifs = sorted((Path(ase.__file__).parent / "test/testdata/minerals").glob("*.cif"))
    assert len(cifs) == 8
    return [(p.name, ase_io.read(p)) for p in cifs]


def _bulk_crystals_via_cif(tmp_path: Path) -> list[tuple[str, object]]:
    import ase.io
    from ase.build import bulk

    out = []
    for name, kw in [("Cu", {"cubic": True}), ("NaCl", {"crystalstructure": "rocksalt", "a": 5.64}),
                     ("Si", {"crystalstructure": "diamond", "a": 5.43}), ("Mg", {"crystalstructure": "hcp"}),
                     ("ZnS", {"crystalstructure": "zincblende", "a": 5.41})]:  # fmt: skip
        path = tmp_path / f"{name}.cif"
        ase.io.write(path, bulk(name, **kw))
        out.append((path.name, ase.io.read(path)))
    return out


def test_round_trip_crystals(tmp_path):
    rng = np.random.default_rng(3)
    tok = OctreeTokenizer("mp20")
    for name, atoms in _ase_crystals() + _bulk_crystals_via_cif(tmp_path):
        lattice = np.asarray(atoms.cell.array)
        r = _rotation(rng)
        lat_r, pos_r = lattice @ r.T, atoms.get_positions() @ r.T
        tokens = tok.tokenize_crystal(atoms.numbers, pos_r, lat_r)
        z, pos, lat = tok.detokenize_crystal(tokens)
        assert np.abs(lat - lat_r).max() <= 2 * HALF_BIN, name  # difference of two corners
        wrapped = ((pos_r @ np.linalg.inv(lat_r)) % 1.0) @ lat_r
        src = tokens.atoms.atom_index
        np.testing.assert_array_equal(z, atoms.numbers[src])
        assert np.abs(pos - wrapped[src]).max() <= HALF_BIN, name


def test_round_trip_protein_alpha_helix():
    # ideal α-helix Cα trace (no PDB file ships with the installed packages): 3.6 residues per turn,
    # 1.5 Å rise, 2.3 Å radius
    n = 150
    k = np.arange(n)
    theta = k * 2 * np.pi / 3.6
    ca = np.stack([2.3 * np.cos(theta), 2.3 * np.sin(theta), 1.5 * k], 1)
    assert np.allclose(np.linalg.norm(np.diff(ca, axis=0), axis=1), 3.8, atol=0.05)  # Cα-Cα ~3.8 Å
    rng = np.random.default_rng(5)
    residues = rng.choice(["ALA", "GLY", "LEU", "LYS", "GLU", "XYZ"], n).tolist()
    tok = OctreeTokenizer("protein")
    r = _rotation(rng)
    moved = ca @ r.T + 11.0
    tokens = tok.tokenize_protein(residues, moved)
    types, pos, _ = detokenize(tokens)
    src = tokens.atom_index
    expected = [f"{res if res != 'XYZ' else 'UNK'}_CA" for res in residues]
    assert [tok.vocab.tokens[t] for t in types] == [expected[i] for i in src]
    assert np.abs(pos - moved[src]).max() <= HALF_BIN
    assert tokens.spec.bins == 48


# --- collisions and bad input ---------------------------------------------------------------------------------


def test_same_cell_collision_is_reported():
    pos = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [1.5, 0.0, 0.0]])
    with pytest.raises(CollisionError, match="atoms 1 and 2 fall in the same 0.24 Å octree cell"):
        tokenize(np.array([6, 6, 1]), pos)
    # a finer cell separates atoms 0.1 Å apart that share a 0.24 Å cell
    pos = np.array([[0.03, 0.03, 0.03], [0.13, 0.03, 0.03]])
    spec = OctreeSpec(cell=0.24, resolution=0.01, depth=6)
    with pytest.raises(CollisionError):
        tokenize(np.array([1, 1]), pos, spec, center=np.full((1, 3), spec.box / 2))
    fine = OctreeSpec(cell=0.04, resolution=0.01, depth=8)
    t = tokenize(np.array([1, 1]), pos, fine)
    assert len(t.atom_type) == 2


def test_bad_inputs():
    tok = OctreeTokenizer("qm9")
    with pytest.raises(DataFormatError, match="atomic number 119"):
        tok.tokenize(np.array([6, 119]), np.array([[0.0, 0, 0], [1.0, 0, 0]]))
    with pytest.raises(DataFormatError, match="atomic number 0"):
        tok.tokenize(np.array([0]), np.zeros((1, 3)))
    with pytest.raises(DataFormatError, match="empty structure"):
        tok.tokenize(np.zeros(0, np.int64), np.zeros((0, 3)))
    with pytest.raises(DataFormatError, match="NaN"):
        tok.tokenize(np.array([6]), np.array([[np.nan, 0, 0]]))
    long_chain = np.stack([np.arange(20) * 1.5, np.zeros(20), np.zeros(20)], 1)  # 28.5 Å > 15.36 Å
    with pytest.raises(DataFormatError, match="does not fit the 15.36 Å octree box"):
        tok.tokenize(np.full(20, 6), long_chain)


def test_cutoff_crops_and_reports():
    long_chain = np.stack([np.arange(20) * 1.5, np.zeros(20), np.zeros(20)], 1)
    tok = OctreeTokenizer("qm9", cutoff=True)
    tokens = tok.tokenize(np.full(20, 6), long_chain, rng=np.random.default_rng(0))
    kept = len(tokens.atom_type)
    assert tokens.cropped[0] == 20 - kept and 0 < kept < 20
    _, pos = tok.detokenize(tokens)
    np.testing.assert_allclose(pos, long_chain[tokens.atom_index], atol=HALF_BIN)
    assert np.ptp(pos[:, 0]) < PRESETS["qm9"].box


def test_json_round_trip_and_malformed_tree(tmp_path):
    tok = OctreeTokenizer("qm9")
    pos = np.array([[0.0, 0.0, 0.0], [1.09, 0.0, 0.0], [-0.36, 1.03, 0.0]])
    tokens = tok.tokenize(np.array([6, 1, 1]), pos)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tok.to_json(tokens)))
    back = tok.from_json(json.loads(path.read_text()))
    np.testing.assert_array_equal(back.tree_cell, tokens.tree_cell)
    np.testing.assert_array_equal(back.tree_level, tokens.tree_level)
    z, p = tok.detokenize(back)
    np.testing.assert_allclose(p, pos[tokens.atom_index], atol=HALF_BIN)
    assert z.tolist() == np.array([6, 1, 1])[tokens.atom_index].tolist()
    with pytest.raises(DataFormatError, match="left over"):
        decode_tree(np.concatenate([tokens.tree, [1]]), np.array([0, len(tokens.tree) + 1]), 6)
    with pytest.raises(DataFormatError, match="end before"):
        decode_tree(tokens.tree[:-1], np.array([0, len(tokens.tree) - 1]), 6)


def test_in_cell_offsets_follow_a_translation_of_the_input():
    """The box origin lies on the input frame's cell lattice, so an atom's in-cell offset is its own
    position modulo the cell: translating the input by 0.05 Å moves every x offset by 5 bins (mod 24).
    With the box merely centred on the (quantised) bounding box, a translation would be cancelled and
    the offsets would not move (the reference's training jitter would do nothing)."""
    tok = OctreeTokenizer("qm9")
    rng = np.random.default_rng(3)
    pos = rng.uniform(-3.0, 3.0, (12, 3))
    pos = pos[np.argsort(pos[:, 0])]
    pos[:, 0] += np.arange(12) * 0.3  # atoms at least 0.3 Å apart along x: no shared finest cell
    numbers = np.full(12, 6)
    bins, res = tok.spec.bins, tok.spec.resolution
    for t in (0.05, 0.13, 0.24, -0.07):
        a = tok.tokenize(numbers, pos)
        b = tok.tokenize(numbers, pos + np.array([t, 0.0, 0.0]))
        xa = a.atom_xyz[np.argsort(a.atom_index)]
        xb = b.atom_xyz[np.argsort(b.atom_index)]
        q = np.rint(pos[:, 0] / res).astype(np.int64)
        qt = np.rint((pos[:, 0] + t) / res).astype(np.int64)
        np.testing.assert_array_equal(xa[:, 0], q % bins)  # offsets = position modulo the cell
        np.testing.assert_array_equal(xb[:, 0], qt % bins)
        np.testing.assert_array_equal(xa[:, 1:], xb[:, 1:])
