"""``AllReduceSyncBatchNorm`` (``pipelines/sync_batchnorm.py``) against plain BatchNorm on one process.

The reference: a plain ``torch.nn.BatchNorm1d`` / ``BatchNorm3d`` model in this process on the
concatenation of the ranks' batches. Two gloo processes on CPU (this file run as a script) each run
their share — unequal (3 and 5 volumes for BatchNorm3d; 3 and 4 rows, then 0 and 7 rows for
BatchNorm1d) — through the converted model for two training steps. Synchronised statistics make
every rank's output slice, the running statistics and ``num_batches_tracked`` equal the reference's;
unsynchronised ones (each rank its own batch) would not. Gradients: the loss is a sum over rows, so
the reference's loss is the sum of the ranks' losses and its gradient the sum of the ranks'
gradients (the all-reduce's backward brings the other ranks' terms of the statistics' gradient into
each rank); DDP would average them, i.e. divide that sum by the world size. Ranks and reference run
in float64 so that the 1e-5 tolerance tests the algorithm, not float32 rounding of gradients ~10-50.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROWS = [(3, 4), (0, 7)]  # BatchNorm1d rows per rank at steps 1 and 2 (rank 0 empty at step 2)
VOLUMES = (3, 5)  # BatchNorm3d volumes per rank, both steps


class Net(torch.nn.Module):
    """Linear -> BatchNorm1d on rows, Conv3d -> BatchNorm3d on volumes (momentum None: cumulative)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.bn1 = torch.nn.BatchNorm1d(6)
        self.conv = torch.nn.Conv3d(3, 4, 1)
        self.bn3 = torch.nn.BatchNorm3d(4, momentum=None)

    def forward(self, rows: torch.Tensor, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn1(self.lin(rows)), self.bn3(self.conv(volumes))


def make_net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype)
    with torch.no_grad():  # BatchNorm weights away from 1/0 so their gradients matter
        for bn in (net.bn1, net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return net


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s whole batch (offset from zero: the shifted sums must not cancel) and loss weights."""
    g = torch.Generator().manual_seed(100 + step)
    n_rows, n_vol = sum(ROWS[step]), sum(VOLUMES)
    return {
        "rows": torch.randn(n_rows, 4, generator=g) * 2 + 5,
        "volumes": torch.randn(n_vol, 3, 2, 3, 2, generator=g) + 3,
        "w_rows": torch.randn(n_rows, 6, generator=g),
        "w_volumes": torch.randn(n_vol, 4, 2, 3, 2, generator=g),
    }


def shard(batch: dict[str, torch.Tensor], step: int, rank: int) -> dict[str, torch.Tensor]:
    r0, v0 = sum(ROWS[step][:rank]), sum(VOLUMES[:rank])
    rows = slice(r0, r0 + ROWS[step][rank])
    vols = slice(v0, v0 + VOLUMES[rank])
    return {"rows": batch["rows"][rows], "w_rows": batch["w_rows"][rows],
            "volumes": batch["volumes"][vols], "w_volumes": batch["w_volumes"][vols]}


def train_steps(net: torch.nn.Module, rank: int | None) -> dict[str, object]:
    """Two training steps (no parameter update); rank None: the whole batch. Outputs and gradients per step."""
    record: dict[str, object] = {"steps": []}
    for step in range(len(ROWS)):
        batch = global_batch(step) if rank is None else shard(global_batch(step), step, rank)
        first = next(net.parameters())
        batch = {k: v.to(device=first.device, dtype=first.dtype) for k, v in batch.items()}
        net.zero_grad()
        out_rows, out_vol = net(batch["rows"], batch["volumes"])
        loss = (out_rows * batch["w_rows"]).sum() + (out_vol * batch["w_volumes"]).sum()
        loss.backward()
        grads = {k: p.grad.detach().cpu() for k, p in net.named_parameters()}
        record["steps"].append({"rows": out_rows.detach().cpu(), "volumes": out_vol.detach().cpu(), "grads": grads})
    record["buffers"] = {k: b.detach().cpu() for k, b in net.named_buffers()}
    return record


def _rank_main(rank: int, world: int, port: int, out: str, backend: str) -> None:
    import torch.distributed as dist

    from threefold.pipelines.sync_batchnorm import AllReduceSyncBatchNorm, convert_sync_batchnorm

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    net = convert_sync_batchnorm(make_net(torch.float64))
    if backend == "nccl":
        net = net.cuda()
    assert isinstance(net.bn1, AllReduceSyncBatchNorm) and isinstance(net.bn3, AllReduceSyncBatchNorm)
    torch.save(train_steps(net, rank), out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(folder: Path, backend: str) -> list[dict[str, object]]:
    port = _free_port()
    script = [sys.executable, str(HERE)]
    procs = [subprocess.Popen([*script, str(r), "2", str(port), str(folder / f"rank{r}.pt"), backend],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output[-3000:]
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, object]]:
    return _launch_two_ranks(tmp_path_factory.mktemp("syncbn"), "gloo")


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(two_ranks):
    _assert_equal_to_one_process(two_ranks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_gpu_ranks_equal_one_cpu_process_on_the_whole_batch(tmp_path):
    """The same comparison with one rank per GPU over NCCL (the reference stays on the CPU), rank 0 empty at
    step 2 included: on GPUs nothing checks the count on the host, so an empty rank must still be exact."""
    _assert_equal_to_one_process(_launch_two_ranks(tmp_path, "nccl"))


def _assert_equal_to_one_process(two_ranks: list[dict[str, object]]) -> None:
    reference = train_steps(make_net(torch.float64), None)
    for step, ref in enumerate(reference["steps"]):
        rows = torch.cat([two_ranks[r]["steps"][step]["rows"] for r in range(2)])
        volumes = torch.cat([two_ranks[r]["steps"][step]["volumes"] for r in range(2)])
        torch.testing.assert_close(rows, ref["rows"], rtol=0, atol=1e-5)
        torch.testing.assert_close(volumes, ref["volumes"], rtol=0, atol=1e-5)
        for name, grad in ref["grads"].items():
            summed = two_ranks[0]["steps"][step]["grads"][name] + two_ranks[1]["steps"][step]["grads"][name]
            torch.testing.assert_close(summed, grad, rtol=0, atol=1e-5, msg=f"step {step} gradient of {name}")
    for rank in range(2):
        assert two_ranks[rank]["buffers"].keys() == reference["buffers"].keys()
        for name, buf in reference["buffers"].items():
            torch.testing.assert_close(two_ranks[rank]["buffers"][name], buf, rtol=0, atol=1e-5, msg=name)
    assert int(two_ranks[0]["buffers"]["bn1.num_batches_tracked"]) == 2


def test_empty_rank_output_is_empty_and_finite(two_ranks):
    empty = two_ranks[0]["steps"][1]
    assert empty["rows"].shape == (0, 6)
    for grad in empty["grads"].values():
        assert torch.isfinite(grad).all()


def test_without_process_group_equals_plain_batchnorm_bitwise():
    from threefold.pipelines.sync_batchnorm import convert_sync_batchnorm

    plain, synced = train_steps(make_net(), None), train_steps(convert_sync_batchnorm(make_net()), None)
    for a, b in zip(plain["steps"], synced["steps"]):
        assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["volumes"], b["volumes"])
        assert all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
    assert all(torch.equal(plain["buffers"][k], synced["buffers"][k]) for k in plain["buffers"])


def test_fewer_than_two_values_over_all_processes_raise_on_cpu(monkeypatch):
    # a 2-process group whose other rank is empty, simulated: the all-reduce returns this rank's sums
    from threefold.pipelines import sync_batchnorm as sbn

    monkeypatch.setattr(sbn, "_world_size", lambda group: 2)
    monkeypatch.setattr(sbn, "_all_reduce_sum", lambda stats, group: stats)
    bn = sbn.convert_sync_batchnorm(torch.nn.BatchNorm1d(3)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel.*got 1"):
        bn(torch.randn(1, 3))
    assert torch.isfinite(bn(torch.randn(2, 3))).all()  # two values: fine


def test_eval_mode_equals_plain_batchnorm():
    from threefold.pipelines.sync_batchnorm import convert_sync_batchnorm

    plain = make_net()
    train_steps(plain, None)  # running statistics away from their initial values
    synced = convert_sync_batchnorm(plain).eval()
    batch = global_batch(0)
    reference = [bn.eval() for bn in (torch.nn.BatchNorm1d(6), torch.nn.BatchNorm3d(4))]
    for ref, layer in zip(reference, (synced.bn1, synced.bn3)):
        ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        rows, volumes = synced(batch["rows"], batch["volumes"])
        assert torch.equal(rows, reference[0](synced.lin(batch["rows"])))
        assert torch.equal(volumes, reference[1](synced.conv(batch["volumes"])))


def test_convert_and_revert_round_trip():
    from threefold.pipelines.sync_batchnorm import (
        AllReduceSyncBatchNorm,
        convert_sync_batchnorm,
        revert_sync_batchnorm,
    )

    net = make_net()
    train_steps(net, None)
    net.bn3.weight.requires_grad_(False)
    net.bn1.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_sync_batchnorm(net)
    assert [type(m) for m in (converted.bn1, converted.bn3)] == [AllReduceSyncBatchNorm] * 2
    assert not converted.bn1.training and converted.bn3.training and not converted.bn3.weight.requires_grad
    assert converted.bn3.momentum is None and converted.bn1.eps == net.bn1.eps
    reverted = revert_sync_batchnorm(converted)
    assert (type(reverted.bn1), type(reverted.bn3)) == (torch.nn.BatchNorm1d, torch.nn.BatchNorm3d)
    after = reverted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not reverted.bn1.training and not reverted.bn3.weight.requires_grad
    # a BatchNorm as the root module is replaced too
    assert type(revert_sync_batchnorm(convert_sync_batchnorm(torch.nn.BatchNorm2d(3)))) is torch.nn.BatchNorm2d


# Loaded by every process of the CLI run below (PYTHONPATH): each synchronised training forward of an
# AllReduceSyncBatchNorm appends a line to <SYNCBN_TRACE>/<pid>.txt.
TRACE_HOOK = """
import os
from pathlib import Path

from threefold.pipelines import sync_batchnorm as sbn

_forward = sbn.AllReduceSyncBatchNorm.forward
_trace = Path(os.environ["SYNCBN_TRACE"]) / f"{os.getpid()}.txt"


def _traced(self, input):
    if self.training and sbn._world_size(self.process_group) > 1:
        with _trace.open("a") as f:
            f.write(f"{tuple(input.shape)}\\n")
    return _forward(self, input)


sbn.AllReduceSyncBatchNorm.forward = _traced
"""


def test_cpu_ddp_pipeline_fit_synchronises_batchnorm(tmp_path):
    """``planetoid-isocvgae`` (BatchNorm1d in encoder and decoder, embedded graph) with 2 CPU processes and
    ``trainer.sync_batchnorm=true``: both processes run synchronised BatchNorm forwards, and the checkpoint
    written during the fit (converted layers) loads strictly into a plain 1-process module."""
    from threefold.pipelines.graphs_ssl import IsoCModule

    hook, trace = tmp_path / "hook", tmp_path / "trace"
    hook.mkdir()
    trace.mkdir()
    (hook / "sitecustomize.py").write_text(TRACE_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook), "SYNCBN_TRACE": str(trace)}
    for key in ("THREEFOLD_RUN_DIR", "THREEFOLD_RESUME"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "threefold.pipelines.cli", "run", "planetoid-isocvgae", "num_seeds=1", "tasks=[node]",
           "trainer.max_epochs=2", "model.hidden=[16,16]", "baselines.enabled=false", "trainer.devices=2",
           "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true",
           "trainer.enable_progress_bar=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    counts = [len(f.read_text().splitlines()) for f in trace.glob("*.txt")]
    assert len(counts) == 2 and min(counts) > 0, counts  # both ranks, synchronised
    (ckpt,) = tmp_path.glob("runs/planetoid-isocvgae/*/seed0/node/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    plain = IsoCModule(saved["hyper_parameters"])
    plain.load_state_dict(saved["state_dict"], strict=True)
    tracked = [v for k, v in saved["state_dict"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) > 0 for v in tracked)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
