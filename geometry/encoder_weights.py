"""Loading a pretrained encoder into a fine-tuning model (Point-MAE, I2P-MAE): the ``encoder.*``
tensors of a pretraining state dict, checked against the receiving encoder before anything is copied."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from threefold.datasets.errors import ConfigError


def load_encoder_weights(encoder: nn.Module, state: Mapping[str, Tensor], source: str, method: str,
                         skip: tuple[str, ...] = ()) -> int:
    """Copy the ``encoder.*`` (or Lightning's ``model.encoder.*``) entries of ``state`` into ``encoder``,
    leaving out names that start with one of ``skip``. Returns the number of tensors loaded; no
    encoder entries, or missing, extra or mis-shaped tensors raise :class:`ConfigError` naming ``source``."""
    enc = {}
    for key, value in state.items():
        for p in ("model.encoder.", "encoder."):
            if key.startswith(p):
                if not key[len(p):].startswith(skip):  # startswith(()) is False: nothing skipped
                    enc[key[len(p):]] = value
                break
    if not enc:
        raise ConfigError(f"{source}: no encoder.* weights (is it a {method} pretraining checkpoint?)")
    own = encoder.state_dict()
    missing = sorted(set(own) - set(enc))
    unexpected = sorted(set(enc) - set(own))
    shapes = [k for k in own if k in enc and own[k].shape != enc[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{source}: encoder weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {shapes[:3]}); model widths/depths must equal the pretraining config's")
    encoder.load_state_dict(enc)
    return len(enc)
