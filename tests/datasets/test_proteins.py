"""Cα-trace readers on PDB / mmCIF files written here from the wwPDB column definitions."""

from __future__ import annotations

import numpy as np
import pytest

from threefold.datasets.errors import DataFormatError
from threefold.datasets.proteins import ideal_alpha_helix_ca, read_mmcif_ca, read_pdb_ca


def _pdb_atom(serial, name, alt, res, chain, seq, xyz, element):
    # wwPDB v3.3 ATOM: cols 1-6 record, 7-11 serial, 13-16 name, 17 altLoc, 18-20 resName, 22 chain,
    # 23-26 resSeq, 31-38 / 39-46 / 47-54 x y z, 55-60 occupancy, 61-66 B, 77-78 element
    return (f"ATOM  {serial:5d} {name:<4s}{alt:1s}{res:3s} {chain:1s}{seq:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{1.0:6.2f}{0.0:6.2f}          {element:>2s}")  # fmt: skip


def test_pdb_ca_trace(tmp_path):
    ca = ideal_alpha_helix_ca(4)
    lines = ["HEADER    TEST", "MODEL        1"]
    for i, res in enumerate(["ALA", "GLY", "LYS", "SER"]):
        lines.append(_pdb_atom(4 * i + 1, " N", " ", res, "A", i + 1, ca[i] - 1.0, "N"))
        lines.append(_pdb_atom(4 * i + 2, " CA", " " if i != 2 else "A", res, "A", i + 1, ca[i], "C"))
        if i == 2:
            lines.append(_pdb_atom(4 * i + 3, " CA", "B", res, "A", i + 1, ca[i] + 5, "C"))
    lines += ["ENDMDL", "MODEL        2", _pdb_atom(99, " CA", " ", "TRP", "A", 9, (0, 0, 0), "C"), "ENDMDL", "END"]
    p = tmp_path / "x.pdb"
    p.write_text("\n".join(lines) + "\n")
    t = read_pdb_ca(p)
    assert t["residues"] == ["ALA", "GLY", "LYS", "SER"] and t["resseq"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(t["positions"], ca, atol=1e-3)
    assert np.allclose(np.linalg.norm(np.diff(t["positions"], axis=0), axis=1), 3.8, atol=0.05)
    p.write_text("HEADER\nEND\n")
    with pytest.raises(DataFormatError, match="no Cα atoms"):
        read_pdb_ca(p)


def test_mmcif_ca_trace(tmp_path):
    ca = ideal_alpha_helix_ca(3)
    rows = []
    for i, res in enumerate(["MET", "VAL", "HIS"]):
        rows.append(f"ATOM {2 * i + 1} N N . {res} A 1 {i + 1} ? {ca[i][0] - 1:.3f} {ca[i][1]:.3f} {ca[i][2]:.3f} 1")
        rows.append(f"ATOM {2 * i + 2} C CA . {res} A 1 {i + 1} ? {ca[i][0]:.3f} {ca[i][1]:.3f} {ca[i][2]:.3f} 1")
    rows.append("ATOM 99 C CA . TRP A 1 9 ? 0.0 0.0 0.0 2")  # second model: ignored
    header = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "auth_asym_id",
              "label_entity_id", "auth_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z",
              "pdbx_PDB_model_num"]  # fmt: skip
    text = "data_test\n#\nloop_\n" + "\n".join(f"_atom_site.{h}" for h in header) + "\n" + "\n".join(rows) + "\n#\n"
    p = tmp_path / "x.cif"
    p.write_text(text)
    t = read_mmcif_ca(p)
    assert t["residues"] == ["MET", "VAL", "HIS"] and t["chains"] == ["A"] * 3
    np.testing.assert_allclose(t["positions"], ca, atol=1e-3)
    p.write_text(text.replace("_atom_site.Cartn_x\n", ""))
    with pytest.raises(DataFormatError, match="lacks"):
        read_mmcif_ca(p)


def test_mmcif_quoting_follows_cif_1_1(tmp_path):
    """CIF 1.1 syntax (IUCr; Hall, Allen & Brown, Acta Cryst. A47, 1991): a quote closes a string only
    when whitespace or the line end follows, so ``"O5'"`` and ``'a'b'`` are one token each and a quote inside an unquoted token is text;
    an opening quote that never closes is an error."""
    header = ["group_PDB", "id", "label_atom_id", "label_comp_id", "auth_asym_id", "auth_seq_id",
              "Cartn_x", "Cartn_y", "Cartn_z"]  # fmt: skip
    rows = ["ATOM 1 \"O5'\" DA A 1 0.0 0.0 0.0",  # a primed nucleotide atom name, quoted as PDBx files do
            "ATOM 2 'CA' 'a'b' A 2 1.0 2.0 3.0",
            "ATOM 3 CA C'X \"B C\" 3 4.0 5.0 6.0"]  # fmt: skip
    text = "data_q\nloop_\n" + "\n".join(f"_atom_site.{h}" for h in header) + "\n" + "\n".join(rows) + "\n#\n"
    p = tmp_path / "q.cif"
    p.write_text(text)
    t = read_mmcif_ca(p)
    assert t["residues"] == ["a'b", "C'X"] and t["chains"] == ["A", "B C"] and t["resseq"].tolist() == [2, 3]
    np.testing.assert_array_equal(t["positions"], [[1, 2, 3], [4, 5, 6]])
    p.write_text(text.replace('"B C"', '"B C'))
    with pytest.raises(DataFormatError, match="line 14: unbalanced quote"):
        read_mmcif_ca(p)
