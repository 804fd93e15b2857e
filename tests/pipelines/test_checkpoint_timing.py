"""The engine's epoch-end checkpoint warns once when saving costs more than the training between saves
(tiny epochs on a GPU), naming the ``trainer.checkpoint_every_n_steps`` value that fixes it — and stays quiet
when saves are cheap or already every N steps."""

from __future__ import annotations

import time
import warnings

import lightning as L
import pytest
import torch

from threefold.pipelines import engine
from threefold.pipelines.config import TrainerConfig
from threefold.pipelines.engine import RunContext


class Tiny(L.LightningModule):
    def __init__(self, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_sleep)
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(8, 3)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)  # 1 step per epoch


def _fit(tmp_path, monkeypatch, save_sleep: float, step_sleep: float, every: int = 0) -> list[str]:
    slow_save = engine.save_atomic

    def save(obj, path):
        time.sleep(save_sleep)
        slow_save(obj, path)

    monkeypatch.setattr(engine, "save_atomic", save)
    cfg = TrainerConfig(max_epochs=5, accelerator="cpu", enable_progress_bar=False, checkpoint_every_n_steps=every)
    ctx = RunContext("tiny", tmp_path, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.fit(Tiny(step_sleep))
    assert ctx.last_checkpoint.is_file()
    return [str(w.message) for w in caught if "checkpoint_every_n_steps" in str(w.message)]


def test_costly_epoch_end_saves_warn_once_with_a_step_count(tmp_path, monkeypatch):
    (message,) = _fit(tmp_path, monkeypatch, save_sleep=0.08, step_sleep=0.0)
    assert "every epoch end" in message and "(1 step)" in message
    every = int(message.split("trainer.checkpoint_every_n_steps=")[1].split()[0])
    assert every >= 10  # a save of >= 0.08 s against a step of a few ms: at least ten steps per save


@pytest.mark.parametrize("save_sleep, step_sleep, every", [(0.0, 0.15, 0), (0.08, 0.0, 2)])
def test_cheap_saves_or_step_checkpoints_do_not_warn(tmp_path, monkeypatch, save_sleep, step_sleep, every):
    assert _fit(tmp_path, monkeypatch, save_sleep, step_sleep, every) == []


def test_checkpoint_state_key_is_plain_model_checkpoints(tmp_path, monkeypatch):
    # runs checkpointed before the timing subclass existed keep their callback state on --resume
    _fit(tmp_path, monkeypatch, save_sleep=0.0, step_sleep=0.0)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    keys = [k for k in saved["callbacks"] if "ModelCheckpoint" in k]
    assert keys == ["ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                    "'every_n_epochs': 1, 'train_time_interval': None}"]
