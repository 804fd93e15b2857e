"""2D-guided masking of I2P-MAE (Zhang et al., CVPR 2023, §3.3 "2D-guided Masking"; reference
``mask_2D_guided`` and the multi-scale back-propagation of the mask in ``H_Encoder.forward``).

1. :func:`center_saliency`: the teacher's [CLS] → patch attention of each view (14 × 14) is upsampled
   bicubically to 224², read at the pixel of every top-scale centre and averaged over the 3 views ->
   one saliency per centre.
2. :func:`guided_mask`: softmax of the saliencies over the centres, a visiting order drawn without
   replacement from it, the first ``G - int(ratio · G)`` visible (ratio 0.8 → 13 of 64), the rest masked.
   Salient centres are more likely to stay visible, so the encoder sees the semantically important parts.
3. :func:`propagate_mask`: a token of a lower scale is visible only if it belongs (is one of the kNN
   members) of a visible token of the scale above, so visible tokens at every scale cover the same
   regions; their counts vary across the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError
from threefold.geometry.i2pmae.projection import ViewGeometry, sample_view_map, view_coordinates


def center_saliency(attention: Tensor, centers: Tensor, geoms: list[ViewGeometry]) -> Tensor:
    """``attention (V, B, h, w)`` per view, ``centers (B, G, 3)`` in the cloud's frame, one geometry per
    view -> ``(B, G)`` float32 saliency (mean over views of the upsampled attention at each centre)."""
    total = 0
    for v, geom in enumerate(geoms):
        total = total + sample_view_map(attention[v].unsqueeze(1).float(), view_coordinates(centers, v), geom)[..., 0]
    return total / len(geoms)


def guided_mask(saliency: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """``saliency (B, G)`` -> ``mask (B, G)`` bool, True = masked, exactly ``int(ratio · G)`` per cloud;
    the visible ones are the first of an order drawn without replacement from ``softmax(saliency)``.
    The draw runs on ``generator``'s device (saliency moved there if needed)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"mask ratio {ratio} must be in [0, 1)")
    b, g = saliency.shape
    keep = g - int(ratio * g)
    probs = torch.softmax(saliency.float(), 1)
    if generator is not None:
        probs = probs.to(generator.device)
    order = torch.multinomial(probs, g, replacement=False, generator=generator)  # (B, G)
    mask = torch.ones(b, g, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :keep], False)
    return mask.to(saliency.device)


def propagate_mask(parent_mask: Tensor, member_idx: Tensor, num_children: int) -> Tensor:
    """``parent_mask (B, Gp)`` bool (True = masked), ``member_idx (B, Gp, k)`` int64 indices of each
    parent's members among the ``num_children`` tokens below -> ``child_mask (B, num_children)`` bool:
    a child is visible iff it is a member of at least one visible parent."""
    b, _, k = member_idx.shape
    visible = (~parent_mask).unsqueeze(-1).expand(-1, -1, k).reshape(b, -1).to(torch.int32)
    seen = torch.zeros(b, num_children, dtype=torch.int32, device=member_idx.device)
    seen.scatter_reduce_(1, member_idx.reshape(b, -1), visible, reduce="amax")
    return seen == 0
