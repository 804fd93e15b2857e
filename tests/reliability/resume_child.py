"""Child process of test_resume.py (not a test module): trains a small point-cloud classifier on
ragged batches through ``RunContext.fit`` and can SIGKILL itself at a given global step.

argv: one or more jobs ``run_dir,loader,ckpt_every,kill_at_step,resume[,devices]`` run in turn in this process;
loader is resumable | plain | resumable-norng, kill_at_step -1 never kills, resume is 0 or 1.
Each job writes run_dir/order.jsonl (the sample indices of every executed step; order-rank<r>.jsonl
under DDP) and run_dir/final.pt.
"""

from __future__ import annotations

import json
import os
import hashlib
import random
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from threefold.datasets.collate import collate_points
from threefold.datasets.splits import seed_everything
from threefold.pipelines.config import TrainerConfig
from threefold.pipelines.engine import RunContext
from threefold.pipelines.loaders import ResumableDataLoader, ResumeStateCallback

NUM_CLASSES = 3


class Clouds(Dataset):
    """Ragged clouds, 20..36 points, whose class sets the axis scales; each made from its own seed."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.offset + i)
        k = i % NUM_CLASSES
        pts = torch.randn(20 + (i * 7) % 17, 3, generator=g) * torch.tensor([1.0 + k, 1.0, 0.5 + 0.5 * k])
        return {"coord": pts, "feat": pts.norm(dim=1, keepdim=True), "cls": k, "index": i}


def collate(samples: list[dict]) -> dict:
    b = collate_points(samples)
    b["cls"] = torch.tensor(b["cls"])
    return b


class PointClassifier(L.LightningModule):
    """Shared point MLP, per-cloud max pool over the ragged batch, linear head; dropout and global-RNG
    jitter so that a wrongly restored generator changes the result."""

    def __init__(self, hparams: dict) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 32))
        self.head = torch.nn.Linear(32, NUM_CLASSES)
        self.kill_at = hparams["kill_at"]
        self.order_dir = Path(hparams["run_dir"])

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.mlp(torch.cat([batch["coord"], batch["feat"]], 1))
        owner = torch.repeat_interleave(torch.arange(len(batch["offset"])), torch.diff(batch["offset"], prepend=batch["offset"].new_zeros(1)))
        pooled = torch.full((len(batch["offset"]), x.shape[1]), -torch.inf).scatter_reduce(0, owner[:, None].expand_as(x), x, "amax")
        return self.head(pooled)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        name = "order.jsonl" if self.trainer.world_size == 1 else f"order-rank{self.global_rank}.jsonl"
        with (self.order_dir / name).open("a") as f:
            f.write(json.dumps({"step": self.global_step, "index": batch["index"], "rng": _rng_fingerprint()}) + "\n")
        batch = dict(batch, coord=batch["coord"] + 0.01 * torch.randn_like(batch["coord"]))
        weight = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        loss = weight * torch.nn.functional.cross_entropy(self(batch), batch["cls"])
        self.log("train_loss", loss, batch_size=len(batch["offset"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch["cls"]), batch_size=len(batch["offset"]))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _rng_fingerprint() -> str:
    """A digest of the three process-global generators' states as a training step starts."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    h.update(np.random.get_state(legacy=True)[1].tobytes())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()[:16]


class Data(L.LightningDataModule):
    def __init__(self, resumable: bool) -> None:
        super().__init__()
        self.resumable = resumable
        self.train_set, self.val_set = Clouds(40, 0), Clouds(12, 1000)

    def train_dataloader(self):
        if self.resumable:
            return ResumableDataLoader(self.train_set, batch_size=4, seed=7, collate_fn=collate)
        return DataLoader(self.train_set, batch_size=4, shuffle=True, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=6, collate_fn=collate)


def train(run_dir: Path, loader: str, every: int, kill_at: int, resume: bool, devices: int = 1) -> None:
    """One fit from a fresh seed (or resumed from run_dir's last.ckpt); writes run_dir/final.pt.
    ``devices`` > 1 runs DDP over gloo on CPU (Lightning relaunches this script once per extra rank)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(3)
    cfg = TrainerConfig(max_epochs=3, accelerator="cpu", devices=devices, log_every_n_steps=1, enable_progress_bar=False,
                        checkpoint_every_n_steps=every, strategy="ddp" if devices > 1 else "auto")
    ctx = RunContext("resume-test", run_dir, cfg, resume=resume)
    module = PointClassifier({"kill_at": kill_at, "run_dir": str(run_dir)})
    restore = ResumeStateCallback.on_train_start
    if loader == "resumable-norng":  # negative control: the generators are not restored on resume
        ResumeStateCallback.on_train_start = lambda self, trainer, module: None
    try:
        trainer = ctx.fit(module, Data(loader.startswith("resumable")))
    finally:
        ResumeStateCallback.on_train_start = restore
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.save({"state": module.state_dict(), "metrics": metrics, "global_step": trainer.global_step}, run_dir / "final.pt")


def main() -> None:
    torch.set_num_threads(1)
    for job in sys.argv[1:]:  # several fits in one process share the import cost
        run_dir, loader, every, kill_at, resume, *devices = job.split(",")
        train(Path(run_dir), loader, int(every), int(kill_at), resume == "1", int(devices[0]) if devices else 1)


if __name__ == "__main__":
    main()
