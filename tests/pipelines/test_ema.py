"""EMA of the weights (``threefold.pipelines.ema``): the formula against a NumPy loop, bitwise swaps,
checkpoint round trips (also through a Lightning ``--resume``), decay 0 = off, and qm9-uni3dar with
EMA on end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from threefold.datasets.errors import ConfigError
from threefold.pipelines.ema import EMACallback, ema_callback, ema_decay_at, ema_state_dict


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    m[2].bias.requires_grad_(False)  # frozen: copied, not averaged
    return m


def _train(model: torch.nn.Module, ema: EMACallback | None, steps: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """SGD steps on fixed random data; the weights after each step (float64) and one EMA update per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    seen = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        seen.append({k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()})
    return seen


def _numpy_ema(w0: np.ndarray, ws: list[np.ndarray], decay: float, shift: int = 0) -> np.ndarray:
    s = w0.astype(np.float64)
    for n, w in enumerate(ws):
        n += shift  # shift != 0: a wrong warm-up, to show the comparison can fail
        d = min(decay, (1 + n) / (10 + n))
        s = d * s + (1 - d) * w
    return s


@pytest.mark.parametrize("decay, steps", [(0.5, 14), (0.999, 60)])
def test_ema_equals_a_numpy_loop_of_the_formula(decay, steps):
    model = _tiny()
    w0 = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
    ema = EMACallback(decay)
    ema.initialize(model)
    seen = _train(model, ema, steps)  # 0.5 is reached at n = 8: warm-up and capped regime both covered
    assert ema.num_updates == steps
    for k in ("0.weight", "0.bias", "1.weight", "2.weight"):
        want = _numpy_ema(w0[k], [s[k] for s in seen], decay)
        np.testing.assert_allclose(ema.shadow[k].double().numpy(), want, rtol=1e-5, atol=1e-6)
        # the comparison can fail: the warm-up shifted by one update is outside the tolerance (0.bias is
        # nearly constant: the batch norm after it cancels it)
        assert k == "0.bias" or not np.allclose(_numpy_ema(w0[k], [s[k] for s in seen], decay, shift=1), want, rtol=1e-5, atol=1e-6)
    for k in ("2.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):  # frozen / buffers: copied
        np.testing.assert_array_equal(ema.shadow[k].double().numpy(), seen[-1][k])
    assert ema.shadow["0.weight"].dtype == torch.float32 and ema.shadow["1.num_batches_tracked"].dtype == torch.int64
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999


def test_swap_in_and_back_is_bitwise():
    model = _tiny()
    ema = EMACallback(0.9)
    ema.initialize(model)
    _train(model, ema, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.swap_in(model)
    assert ema.swapped_in
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema.shadow[k].to(v.dtype))
    assert not torch.equal(model[0].weight, before["0.weight"])  # the average differs from the last weights
    with pytest.raises(RuntimeError):
        ema.swap_in(model)
    ema.swap_back(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not ema.swapped_in


def test_checkpoint_round_trip_continues_the_same_average(tmp_path):
    a, b = _tiny(), _tiny()
    ema_a = EMACallback(0.95)
    ema_a.initialize(a)
    _train(a, ema_a, 10, seed=1)
    torch.save({"callbacks": {ema_a.state_key: ema_a.state_dict()}}, tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=True)  # tensors and plain types only
    b.load_state_dict(a.state_dict())
    ema_b = EMACallback(0.5)  # decay comes from the checkpoint
    ema_b.load_state_dict(ckpt["callbacks"]["EMACallback"])
    ema_b.initialize(b)  # keeps the restored shadow
    assert ema_b.decay == 0.95 and ema_b.num_updates == 10
    _train(a, ema_a, 10, seed=2)
    _train(b, ema_b, 10, seed=2)
    for k in ema_a.shadow:
        assert torch.equal(ema_a.shadow[k], ema_b.shadow[k]), k
    assert set(ema_state_dict(ckpt)) == set(a.state_dict())


def test_decay_zero_is_no_callback():
    assert ema_callback(0.0) is None and ema_callback(0) is None
    assert isinstance(ema_callback(0.999), EMACallback)
    with pytest.raises(ConfigError, match="EMA decay"):
        EMACallback(1.0)
    assert ema_state_dict({"state_dict": {}}) is None


# --- through Lightning --------------------------------------------------------------------------------------


class _Regression:
    """A Lightning module on fixed data; validation records the weights it saw."""

    @staticmethod
    def build():
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.net = torch.nn.Linear(3, 1)
                self.val_weights: list[torch.Tensor] = []

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def validation_step(self, batch, batch_idx):
                if batch_idx == 0:
                    self.val_weights.append(self.net.weight.detach().clone())

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()

    @staticmethod
    def data():
        import lightning as L

        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 3, generator=g)
        ds = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1)

        class Data(L.LightningDataModule):
            def train_dataloader(self):
                return torch.utils.data.DataLoader(ds, batch_size=4)

            def val_dataloader(self):
                return torch.utils.data.DataLoader(ds, batch_size=16)

        return Data()


def _ctx(run_dir, epochs: int, resume: bool = False):
    from threefold.pipelines.config import TrainerConfig
    from threefold.pipelines.engine import RunContext

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainerConfig(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, log_every_n_steps=1)
    return RunContext("ema-test", run_dir, cfg, resume=resume)


def test_lightning_fit_validates_with_ema_and_resume_continues_it(tmp_path):
    from threefold.pipelines.engine import load_checkpoint
    from threefold.pipelines.uni3dar import fit_with_ema

    straight = _Regression.build()
    _, ema = fit_with_ema(_ctx(tmp_path / "straight", 4), straight, _Regression.data(), 0.9)
    assert ema.num_updates == 4 * 8 and not ema.swapped_in
    # validation (sanity check + one per epoch) saw the EMA weights, training goes on with its own
    assert len(straight.val_weights) == 5
    assert torch.equal(straight.val_weights[-1], ema.shadow["net.weight"])
    assert not torch.equal(straight.net.weight.detach(), ema.shadow["net.weight"])
    ckpt = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")  # weights_only=True
    assert torch.equal(ckpt["state_dict"]["net.weight"], straight.net.weight.detach())  # training weights
    assert torch.equal(ema_state_dict(ckpt)["net.weight"], ema.shadow["net.weight"])

    _, half = fit_with_ema(_ctx(tmp_path / "halves", 2), _Regression.build(), _Regression.data(), 0.9)
    assert half.num_updates == 16
    resumed = _Regression.build()
    _, ema2 = fit_with_ema(_ctx(tmp_path / "halves", 4, resume=True), resumed, _Regression.data(), 0.9)
    assert ema2.num_updates == 32
    torch.testing.assert_close(resumed.net.weight, straight.net.weight, rtol=0, atol=0)
    for k in ema.shadow:
        torch.testing.assert_close(ema2.shadow[k], ema.shadow[k], rtol=0, atol=0)


def test_decay_zero_fits_exactly_as_before(tmp_path):
    from threefold.pipelines.uni3dar import fit_with_ema

    plain = _Regression.build()
    ctx = _ctx(tmp_path / "plain", 2)
    ctx.fit(plain, _Regression.data())
    off = _Regression.build()
    ctx_off = _ctx(tmp_path / "off", 2)
    trainer, ema = fit_with_ema(ctx_off, off, _Regression.data(), 0.0)
    assert ema is None and ctx_off.extra_callbacks == []
    assert not any(isinstance(c, EMACallback) for c in trainer.callbacks)
    assert torch.equal(plain.net.weight, off.net.weight)
    assert [torch.equal(a, b) for a, b in zip(plain.val_weights, off.val_weights)] == [True] * 3
    assert "EMACallback" not in (load_checkpoint_callbacks(tmp_path / "off"))


def load_checkpoint_callbacks(run_dir):
    from threefold.pipelines.engine import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt").get("callbacks", {})


# --- the pipeline -------------------------------------------------------------------------------------------


def test_qm9_uni3dar_with_ema_end_to_end(tmp_path):
    pytest.importorskip("rdkit")
    from threefold.pipelines.cli import main
    from threefold.pipelines.engine import load_checkpoint
    from threefold.pipelines.registry import get_pipeline

    overrides = [
        "limit_molecules=24", "heldout_fraction=0.25", "model.d_model=32", "model.layers=1", "model.heads=2",
        "trainer.max_epochs=2", "trainer.batch_size=6", "sample.num=4", "sample.batch_size=4",
        "sample.max_items=120", "trainer.accelerator=cpu", "optim.ema_decay=0.999",
    ]  # fmt: skip
    assert main(["run", "qm9-uni3dar", *overrides, "--runs-dir", str(tmp_path)]) == 0
    run_dir = next((tmp_path / "qm9-uni3dar").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ema_decay"] == 0.999 and metrics["evaluated_weights"] == "ema"
    assert metrics["ema_updates"] == metrics["global_step"] == 6
    raw, avg = metrics["heldout_cross_entropy_training_weights"], metrics["heldout_cross_entropy"]
    assert raw["all"]["tokens"] == avg["all"]["tokens"] and raw["all"]["model_nats"] != avg["all"]["model_nats"]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    shadow = ema_state_dict(ckpt)
    assert shadow is not None and set(shadow) == set(ckpt["state_dict"])
    if (run_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        exported = load_file(str(run_dir / "model.safetensors"))
    else:  # safetensors not installed: the engine writes model.pt
        exported = torch.load(run_dir / "model.pt", weights_only=True)
    # the exported weights are the EMA weights, not the last training ones
    assert set(exported) == {k[len("model."):] for k in shadow}
    for k, v in exported.items():
        assert torch.equal(v, shadow[f"model.{k}"]), k
    assert any(not torch.equal(v, ckpt["state_dict"][f"model.{k}"]) for k, v in exported.items())
    sampler = get_pipeline("qm9-uni3dar").load(None, run_dir / "checkpoints" / "last.ckpt")
    assert sampler.module.weights_source == "ema"
    for k, v in sampler.module.state_dict().items():
        assert torch.equal(v, shadow[k]), k
