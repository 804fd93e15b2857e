"""Exponential moving average (EMA) of a model's weights, as a Lightning callback.

After each optimizer step the callback updates a shadow copy of the trainable parameters,

    shadow <- d_n * shadow + (1 - d_n) * weights,   d_n = min(decay, (1 + n) / (10 + n)),

where n = 0, 1, 2, ... counts the updates made so far. The second term is the usual warm-up of the
decay (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``): 0.1, 0.18, 0.25, ... at the first
updates, ``decay`` from n = (10 decay - 1) / (1 - decay) on (n = 8,990 for 0.999), so a short run
is not dominated by the initial weights. The reference Uni-3DAR (dptech-corp/Uni-3DAR,
``--ema-decay 0.999``) validates with an EMA of decay 0.999.

The shadow is float32 (float64 parameters stay float64) on the parameters' device; frozen parameters
and the persistent buffers (BatchNorm statistics, ...) are copied as they are at each update. The EMA
weights are swapped in for validation and swapped back before training continues (bitwise: the
training weights are cloned aside and copied back); pipelines swap them in for their evaluation,
sampling and weight export (:meth:`EMACallback.swap_in` / :meth:`EMACallback.swap_back`).

The state (decay, number of updates, shadow tensors) goes into the Lightning checkpoint under
``callbacks[EMACallback.state_key]`` as tensors and plain numbers, so it loads with
``torch.load(weights_only=True)`` and ``--resume`` continues the same average.
:func:`ema_state_dict` reads the EMA weights from a checkpoint for loading into a module.

Under DDP every rank holds the same parameters after each step (gradients are all-reduced before
the step), so each rank updates its own identical shadow and no communication is needed.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning.pytorch.callbacks import Callback

from threefold.datasets.errors import ConfigError


def ema_decay_at(decay: float, n: int) -> float:
    """Decay of the update that follows ``n`` earlier updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(float(decay), (1.0 + n) / (10.0 + n))


def _tracked(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by their ``state_dict`` names."""
    keys = set(module.state_dict().keys())
    out = {k: p for k, p in module.named_parameters() if k in keys}
    out.update({k: b for k, b in module.named_buffers() if k in keys})
    return out


class EMACallback(Callback):
    """Shadow weights ``shadow <- d_n shadow + (1 - d_n) w`` after every optimizer step (see the module doc).

    ``decay`` must be in (0, 1); a decay of 0 means "no EMA": build no callback at all then
    (:func:`ema_callback`).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay {decay}: expected 0 < decay < 1 (0 = off: no callback)")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] | None = None
        self._last_step: int | None = None
        self._plan: tuple | None = None  # (module, averaged shadows, their weights, copied pairs)

    # --- the average ----------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return "EMACallback"

    def initialize(self, module: torch.nn.Module) -> None:
        """Start the shadow from the module's current weights (n = 0), unless a restored one exists."""
        tracked = _tracked(module)
        if self.shadow:
            missing = sorted(set(tracked) ^ set(self.shadow))
            if missing:
                raise ConfigError(f"the checkpoint's EMA state does not match the model (parameters only on one "
                                  f"side: {missing[:5]}); resume with the model config the run was trained with")
            self.shadow = {k: v.to(tracked[k].device) for k, v in self.shadow.items()}
            self._plan = None
            return
        self.shadow = {k: self._shadow_copy(t) for k, t in tracked.items()}
        self.num_updates = 0
        self._plan = None

    @staticmethod
    def _shadow_copy(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.is_floating_point():
            return t.to(torch.promote_types(t.dtype, torch.float32), copy=True)
        return t.clone()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One EMA update from the module's current weights."""
        if not self.shadow:
            self.initialize(module)
        if self._plan is None or self._plan[0] is not module:
            avg_s, avg_w, copies = [], [], []
            for k, t in _tracked(module).items():
                s = self.shadow[k]
                if isinstance(t, torch.nn.Parameter) and t.requires_grad and t.is_floating_point():
                    avg_s.append(s)
                    avg_w.append(t)
                else:
                    copies.append((s, t))
            self._plan = (module, avg_s, avg_w, copies)
        _, avg_s, avg_w, copies = self._plan
        d = ema_decay_at(self.decay, self.num_updates)
        for s, t in copies:
            s.copy_(t.detach())
        if avg_s:
            weights = [w.detach().to(s.dtype) for s, w in zip(avg_s, avg_w)]
            torch._foreach_mul_(avg_s, d)
            torch._foreach_add_(avg_s, weights, alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def swap_in(self, module: torch.nn.Module) -> None:
        """Put the EMA weights into ``module`` (the training weights are kept aside)."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in")
        if not self.shadow:
            self.initialize(module)
        tracked = _tracked(module)
        self._backup = {k: t.detach().clone() for k, t in tracked.items()}
        for k, t in tracked.items():
            t.copy_(self.shadow[k].to(t.dtype))

    @torch.no_grad()
    def swap_back(self, module: torch.nn.Module) -> None:
        """Restore the training weights (bitwise) after :meth:`swap_in`."""
        if self._backup is None:
            return
        for k, t in _tracked(module).items():
            t.copy_(self._backup[k])
        self._backup = None

    @property
    def swapped_in(self) -> bool:
        return self._backup is not None

    # --- checkpoint state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": int(self.num_updates),
                "shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
        self._plan = None

    # --- Lightning hooks --------------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        # a shadow restored from the checkpoint (--resume) is kept; else it starts from the weights
        self.initialize(pl_module)
        self._last_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # with gradient accumulation the optimizer steps only every k batches: update once per step
        step = int(trainer.global_step)
        if self._last_step is None or step > self._last_step:
            self.update(pl_module)
            self._last_step = step

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.shadow and trainer.state.fn == "fit":
            self.swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.swap_back(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.swapped_in:  # the checkpoint's state_dict would hold the EMA weights as training weights
            raise RuntimeError("a checkpoint was written while the EMA weights were swapped in")


def ema_callback(decay: float) -> EMACallback | None:
    """An :class:`EMACallback` for ``decay > 0``; ``None`` (no EMA, behaviour as without) for 0."""
    if decay is None or decay <= 0.0:
        return None
    return EMACallback(decay)


def ema_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA weights of a Lightning checkpoint (a ``state_dict`` for the LightningModule), or ``None``
    when it was trained without EMA."""
    state = (checkpoint.get("callbacks") or {}).get("EMACallback")
    return None if not state else dict(state["shadow"])
