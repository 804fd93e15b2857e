"""Graph self-supervision pipelines end to end through the CLI on the embedded SBM defaults and on
real Cora / MUTAG (tiny settings: the real result tables are produced by the commands in
docs/isocvgae.md and docs/selftask.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from threefold.pipelines.cli import main

TINY_ISOC = ["num_seeds=2", "trainer.max_epochs=2", "model.hidden=[16,16]", "baselines.vgae_epochs=5", "baselines.gcn_epochs=5"]


class Result:
    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def threefold(monkeypatch, capsys):
    """The CLI in-process (a subprocess would pay the torch / lightning import on every call)."""

    def call(*args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        # the CLI hands its run folder to DDP children through the environment; start clean each call
        monkeypatch.delenv("THREEFOLD_RUN_DIR", raising=False)
        monkeypatch.delenv("THREEFOLD_RESUME", raising=False)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        return Result(code, capsys.readouterr().err)

    return call


def _metrics(runs: Path, name: str) -> dict:
    (run,) = [p for p in (runs / name).iterdir() if p.is_dir()]
    return json.loads((run / "metrics.json").read_text()), run


def _check_table(table: dict, methods: set[str], n: int = 2) -> None:
    assert set(table) == methods
    for cell in table.values():
        assert cell["n"] == n and 0.0 <= cell["mean"] <= 1.0 and cell["std"] >= 0.0


def test_planetoid_isocvgae_default(tmp_path, threefold):
    out = threefold("run", "planetoid-isocvgae", *TINY_ISOC, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, run = _metrics(tmp_path / "runs", "planetoid-isocvgae")
    assert m["dataset"] == "sbm" and m["seeds"] == [0, 1]
    for key in ("node/linear[public]", "node/linear[full]", "node/mlp[full]", "node/mlp-raw[full]", "link/dot[ROC-AUC]",
                "link/hadamard-mlp[AP]"):
        _check_table(m["tables"][key], {"isocvgae", "random-init", "pyg-vgae"})
    _check_table(m["tables"]["node/supervised[public]"], {"gcn"})
    assert (run / "results.md").read_text().startswith("| metric |")
    ckpt = run / "seed0" / "node" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)  # plain-dict hyper-parameters only
    assert state["global_step"] == 2 and state["hyper_parameters"]["config"]["model"]["hidden"] == [16, 16]


def test_tu_isocvgae_real_mutag(tmp_path, test_data, threefold):
    out = threefold("run", "--data", str(test_data / "tu"), "tu-isocvgae", "dataset=MUTAG", "folds=3",
                    "supervised_epochs=3", *TINY_ISOC, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, _ = _metrics(tmp_path / "runs", "tu-isocvgae")
    assert m["dataset"] == "MUTAG"
    _check_table(m["tables"]["graph/svm[50/20/30]"], {"isocvgae", "random-init", "pyg-vgae"})
    _check_table(m["tables"]["graph/svm[3-fold]"], {"isocvgae", "random-init", "pyg-vgae"})
    _check_table(m["tables"]["graph/supervised[50/20/30]"], {"gin"})


def test_planetoid_selftask_real_cora(tmp_path, test_data, threefold):
    out = threefold("run", "--data", str(test_data / "planetoid"), "planetoid-selftask", "dataset=cora",
                    "task=contextlabel", "num_seeds=1", "trainer.max_epochs=15", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, _ = _metrics(tmp_path / "runs", "planetoid-selftask")
    assert m["lambda"] == 10 and m["task"] == "contextlabel"
    table = m["tables"]["node/test_acc[public]"]
    _check_table(table, {"contextlabel[ica]", "gcn"}, n=1)
    # 15 epochs of a GCN on Cora: well above the 30 % majority class (loose: not a result claim)
    assert table["gcn"]["mean"] > 0.6 and table["contextlabel[ica]"]["mean"] > 0.6


@pytest.mark.parametrize("extra", [["task=edgemask", "two_stage=true", "pretrain_epochs=3"], ["task=correctedlabel", "method=lp"]])
def test_selftask_variants_default(tmp_path, extra, threefold):
    out = threefold("run", "planetoid-selftask", "num_seeds=2", "trainer.max_epochs=3", *extra, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, _ = _metrics(tmp_path / "runs", "planetoid-selftask")
    assert m["dataset"] == "sbm" and len(m["per_seed"]) == 2


def test_bad_config(tmp_path, threefold):
    out = threefold("run", "planetoid-selftask", "task=nope", cwd=tmp_path)
    assert out.returncode != 0 and "nope" in out.stderr and "contextlabel" in out.stderr
    out = threefold("run", "planetoid-isocvgae", "tasks=[graph]", *TINY_ISOC, cwd=tmp_path)
    assert out.returncode != 0 and "graph" in out.stderr


@pytest.mark.gpu
def test_isocvgae_on_gpu(tmp_path, threefold):
    out = threefold("run", "planetoid-isocvgae", *TINY_ISOC, "trainer.accelerator=gpu", "trainer.deterministic=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, _ = _metrics(tmp_path / "runs", "planetoid-isocvgae")
    assert m["tables"]["link/dot[ROC-AUC]"]["isocvgae"]["n"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["pairwisedistance", "distance2clusters", "pairwiseattrsim", "correctedlabel", "edgemask"])
def test_selftask_on_gpu(tmp_path, threefold, task):
    out = threefold("run", "planetoid-selftask", f"task={task}", "num_seeds=1", "trainer.max_epochs=5",
                    "trainer.accelerator=gpu", "trainer.deterministic=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m, _ = _metrics(tmp_path / "runs", "planetoid-selftask")
    assert 0.0 <= m["tables"]["node/test_acc[public]"]["gcn"]["mean"] <= 1.0
