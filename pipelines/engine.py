"""The engine: run folders, Lightning trainers, atomic checkpoints, resume and weight export.

Everything that trains goes through PyTorch Lightning (checkpointing, mixed precision, gradient
accumulation, progress bars, CSV logging, DDP); this module only fixes how threefold configures it:

- a run lives in ``runs/<pipeline>/<timestamp>/`` with ``config.yaml``, ``checkpoints/``,
  ``logs/metrics.csv`` and ``metrics.json``; an existing run folder is never overwritten;
- checkpoints are written atomically (temp file, fsync, rename) and read with
  ``torch.load(weights_only=True)``, so a half-written or code-carrying checkpoint is never loaded;
- ``--resume RUN_DIR`` reopens the folder and continues each fit from its ``last.ckpt``; every
  trainer carries :class:`~threefold.pipelines.loaders.ResumeStateCallback`, so the RNG states and
  the mid-epoch position of a :class:`~threefold.pipelines.loaders.ResumableDataLoader` come back too;
- ``trainer.sync_batchnorm`` (default ``None``: automatic) converts the model's BatchNorm layers to
  ``torch.nn.SyncBatchNorm`` when a fit runs several processes on GPUs (:func:`resolve_sync_batchnorm`);
  ``true`` with several CPU processes converts them to
  :class:`~threefold.pipelines.sync_batchnorm.AllReduceSyncBatchNorm` instead
  (``trainer.sync_batchnorm_impl`` chooses either on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError
from threefold.datasets.paths import atomic_write
from threefold.pipelines.config import TrainerConfig


def _plain_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Writes to a temp file in the target folder and renames it into place; loads weights only."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
            save_atomic(checkpoint, Path(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
            return load_checkpoint(Path(path), map_location=map_location)

    return AtomicCheckpointIO()


def _model_checkpoint(dirpath: Path, every_n_steps: int):
    """Lightning's ``ModelCheckpoint`` as the engine uses it (``last.ckpt`` plus the latest ``step{N}.ckpt``;
    at every epoch end, or every ``trainer.checkpoint_every_n_steps`` steps), warning once when the epoch-end
    saves cost more time than the training between them. Tiny epochs make that happen — the embedded
    samples at GPU batch sizes are one step per epoch, and a save copies weights, optimiser state and EMA
    to the host: Uni-3DAR at batch 256 spent 0.66 s saving per 0.07 s step (docs/uni3dar.md)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_warn

    class TimedModelCheckpoint(ModelCheckpoint):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._epoch_start: float | None = None
            self._first_step = 0
            self._train_s = self._save_s = 0.0
            self._epochs = self._steps = 0
            self._warned = False

        @property
        def state_key(self) -> str:
            # plain ModelCheckpoint's key, so that checkpoints written before this subclass resume its state
            return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._epoch_start, self._first_step = time.perf_counter(), trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self._epoch_start is None or every_n_steps:
                return super().on_train_epoch_end(trainer, pl_module)
            self._train_s += time.perf_counter() - self._epoch_start
            self._steps += trainer.global_step - self._first_step
            self._epochs += 1
            t0 = time.perf_counter()
            super().on_train_epoch_end(trainer, pl_module)
            self._save_s += time.perf_counter() - t0
            if not self._warned and self._epochs >= 3 and self._steps and self._save_s > self._train_s:
                self._warned = True
                save, step = self._save_s / self._epochs, self._train_s / self._steps
                every = math.ceil(10 * save / step)  # saving then costs about a tenth of the training time
                per_epoch = self._steps / self._epochs
                rank_zero_warn(
                    f"saving the checkpoint at every epoch end takes {save:.3f} s, against {self._train_s / self._epochs:.3f} s "
                    f"of training per epoch ({per_epoch:g} step{'' if per_epoch == 1 else 's'}): set "
                    f"trainer.checkpoint_every_n_steps={every} to checkpoint every {every} steps instead", category=UserWarning)

    return TimedModelCheckpoint(dirpath=dirpath, filename="step{step}", auto_insert_metric_name=False, save_last=True,
                                save_top_k=1, every_n_train_steps=every_n_steps or None, save_on_train_epoch_end=True)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise DataFormatError(f"checkpoint {path} could not be loaded as weights ({type(exc).__name__}: {exc})") from exc


def new_run_dir(runs_root: Path, pipeline: str) -> Path:
    """``runs_root/<pipeline>/<YYYYmmdd-HHMMSS>[-N]/``, created fresh (never an existing folder)."""
    base = Path(runs_root) / pipeline
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {base}")


def has_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``; instance,
    layer and group norm are per-sample and need no synchronisation)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def resolve_sync_batchnorm(setting: bool | None, has_bn: bool, world_size: int, on_gpu: bool) -> bool:
    """Whether a fit synchronises its BatchNorm statistics (``trainer.sync_batchnorm``).

    Under DDP each process normalises with the statistics of its own share of the batch; with the
    small per-GPU batches of volumetric and sparse 3D networks (1-2 volumes or scans) those
    statistics are noisy and differ from the single-GPU run at the same global batch, so the
    statistics are synchronised by default on GPUs. ``setting``: ``None`` (auto: on exactly when
    there are several processes, batch norm in the model and GPUs), ``True`` or ``False``. Nothing
    to synchronise with one process or without batch norm: ``False``. How is
    :func:`_sync_batchnorm_kwargs`'s choice (``trainer.sync_batchnorm_impl``).
    """
    if world_size <= 1 or not has_bn:
        return False
    if setting is None:
        return on_gpu
    return bool(setting)


SYNC_BATCHNORM_IMPLS = ("auto", "torch", "allreduce")


def _sync_batchnorm_kwargs(on_gpu: bool, plugins: list[Any], impl: str = "auto") -> dict[str, Any]:
    """Trainer arguments that synchronise BatchNorm (``trainer.sync_batchnorm_impl``): ``"torch"``
    (``"auto"`` on GPUs) is Lightning's ``sync_batchnorm=True`` (``torch.nn.SyncBatchNorm``, CUDA only);
    ``"allreduce"`` (``"auto"`` on CPU) a ``LayerSync`` plugin converting to ``AllReduceSyncBatchNorm``
    (Lightning refuses a custom LayerSync together with ``sync_batchnorm=True``; the strategy applies the
    plugin before wrapping the model in DDP and reverts it at teardown)."""
    if impl == "torch" and not on_gpu:
        raise ConfigError("config key 'trainer.sync_batchnorm_impl': 'torch' (torch.nn.SyncBatchNorm) needs GPUs; "
                          "use 'allreduce' or 'auto' for CPU processes")
    if impl == "torch" or (impl == "auto" and on_gpu):
        return {"sync_batchnorm": True}
    from threefold.pipelines.sync_batchnorm import AllReduceBatchNormSync

    return {"plugins": [*plugins, AllReduceBatchNormSync()]}


@dataclass
class RunContext:
    """What a pipeline's ``run`` gets besides its config: where to write, which data, whether to resume."""

    pipeline: str
    run_dir: Path
    trainer_cfg: TrainerConfig
    data: Path | None = None
    resume: bool = False
    extra_callbacks: list[Any] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    @property
    def resume_checkpoint(self) -> Path | None:
        return self.last_checkpoint if self.resume and self.last_checkpoint.is_file() else None

    def child(self, name: str) -> "RunContext":
        """A sub-run (one seed, one fold) with its own checkpoints and logs under ``run_dir/name``."""
        sub = self.run_dir / name
        sub.mkdir(parents=True, exist_ok=True)
        return RunContext(self.pipeline, sub, self.trainer_cfg, self.data, self.resume, list(self.extra_callbacks))

    def trainer(self, module: torch.nn.Module | None = None, **overrides: Any):
        """A ``lightning.Trainer`` configured from ``trainer_cfg`` (keyword overrides win).

        ``module``: the model the trainer will fit; with it, ``trainer.sync_batchnorm`` is resolved
        against the model and the world size (:func:`resolve_sync_batchnorm`). Evaluation-only
        trainers need none: BatchNorm in eval mode uses its running statistics, never synced.
        """
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        from threefold.pipelines.loaders import ResumeStateCallback

        t = self.trainer_cfg
        if t.sync_batchnorm_impl not in SYNC_BATCHNORM_IMPLS:
            raise ConfigError(f"config key 'trainer.sync_batchnorm_impl': {t.sync_batchnorm_impl!r} is none of "
                              f"{', '.join(SYNC_BATCHNORM_IMPLS)}")
        callbacks = [
            _model_checkpoint(self.checkpoint_dir, t.checkpoint_every_n_steps),
            ResumeStateCallback(),
            *self.extra_callbacks,
        ]
        loggers = [CSVLogger(save_dir=str(self.run_dir), name="logs", version="")]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger
            import tensorboard  # noqa: F401  (optional: only when installed)

            loggers.append(TensorBoardLogger(save_dir=str(self.run_dir), name="tensorboard", version=""))
        except ImportError:
            pass
        kwargs: dict[str, Any] = dict(
            default_root_dir=str(self.run_dir),
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            precision=t.precision,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val,
            limit_train_batches=t.limit_train_batches,
            limit_val_batches=t.limit_val_batches,
            limit_test_batches=t.limit_test_batches,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            log_every_n_steps=t.log_every_n_steps,
            deterministic=t.deterministic,
            enable_progress_bar=t.enable_progress_bar,
            enable_model_summary=False,
            callbacks=callbacks,
            logger=loggers,
            plugins=[_plain_checkpoint_io()],
        )
        kwargs.update(overrides)
        trainer = L.Trainer(**kwargs)
        if module is not None and "sync_batchnorm" not in overrides:
            # The world size and the accelerator are known once Lightning has resolved "auto" and the
            # device list, i.e. after building a Trainer; building one is cheap (nothing launches yet).
            from lightning.pytorch.accelerators import CUDAAccelerator

            world = int(trainer.num_devices) * int(trainer.num_nodes)
            on_gpu = isinstance(trainer.accelerator, CUDAAccelerator)
            if resolve_sync_batchnorm(t.sync_batchnorm, has_batchnorm(module), world, on_gpu):
                trainer = L.Trainer(**{**kwargs, **_sync_batchnorm_kwargs(on_gpu, kwargs["plugins"], t.sync_batchnorm_impl)})
        return trainer

    def fit(self, module: Any, datamodule: Any = None, **trainer_overrides: Any):
        """Train (resuming from ``last.ckpt`` when asked and present); returns the trainer."""
        trainer = self.trainer(module, **trainer_overrides)
        trainer.fit(module, datamodule=datamodule, ckpt_path=self.resume_checkpoint, weights_only=True)
        return trainer

    def export_weights(self, module: torch.nn.Module, name: str = "model") -> Path:
        """Write the model's weights as a plain state dict (safetensors when installed, else ``.pt``)."""
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        try:
            from safetensors.torch import save_file

            path = self.run_dir / f"{name}.safetensors"
            save_file(state, str(path))
        except ImportError:
            path = self.run_dir / f"{name}.pt"
            save_atomic(state, path)
        return path


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON (NaN/inf become null: JSON has no such numbers)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, torch.Tensor):
            return clean(v.tolist())
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(metrics), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
