"""Losses of RAPiD-Seg (Li, Shum, Breckon, ECCV 2024, arXiv 2407.10159).

- :func:`lovasz_softmax` — Berman, Triki, Blaschko, "The Lovász-Softmax loss" (CVPR 2018): the Lovász
  extension of the Jaccard loss of each class, evaluated on the per-point errors ``|1[y=c] − p_c|``;
- :func:`class_aware_contrastive` — the class-aware embedding loss of the double-nested autoencoder:
  cosine similarities between anchor embeddings, the hardest positive (least similar, same class) and
  hardest negative (most similar, other class) of each anchor, hinge margins ``α_p = 0.9`` and
  ``α_n = 0.5``;
- :func:`segmentation_loss` — weighted cross-entropy + Lovász-softmax, the paper's segmentation loss.

Ignored points carry label ``-1`` (package-wide ignore index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -1


def _lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at the sorted errors (Berman et al., Alg. 1)."""
    # integer cumulative sums: exact, and deterministic on CUDA (a float cumsum raises under
    # torch.use_deterministic_algorithms, which Lightning's deterministic=True turns on)
    fg = fg_sorted.long()
    gts = fg.sum()
    intersection = gts - fg.cumsum(0)
    union = gts + (1 - fg).cumsum(0)
    jaccard = 1.0 - intersection.to(fg_sorted.dtype) / union.to(fg_sorted.dtype)
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: str = "present") -> Tensor:
    """Lovász-softmax loss.

    Args:
        probs: ``(N, C)`` float class probabilities (softmax outputs).
        labels: ``(N,)`` int64 in ``[0, C)`` or ``-1`` (ignored).
        classes: ``"present"`` averages over the classes present in ``labels`` (Berman et al.'s
            default), ``"all"`` over every class.

    Returns: scalar tensor; 0 when no point is labelled. With one-hot ``probs`` it equals the mean
    over the averaged classes of ``1 − IoU_c`` (the Lovász extension agrees with the set function
    on the cube's vertices).
    """
    keep = labels != IGNORE_INDEX
    probs, labels = probs[keep], labels[keep]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):  # C classes (19), each a vectorised sort over the points
        fg = (labels == c).to(probs.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def weighted_cross_entropy(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """``Σ_i w_{y_i} · (−log softmax(logits_i)[y_i]) / Σ_i w_{y_i}`` over the labelled points — the value
    of ``F.cross_entropy(weight=w, ignore_index=-1)``, written with ``gather`` because CUDA's NLL loss
    has no deterministic implementation (it raises under ``torch.use_deterministic_algorithms``).
    0 when no point is labelled."""
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        return logits.sum() * 0.0
    y = labels[keep]
    nll = -torch.log_softmax(logits[keep].to(torch.promote_types(logits.dtype, torch.float32)), 1).gather(1, y[:, None]).squeeze(1)
    if class_weights is None:
        return nll.mean()
    w = class_weights.to(nll)[y]
    return (w * nll).sum() / w.sum()


def segmentation_loss(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None,
                      lovasz_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted cross-entropy + ``lovasz_weight`` · Lovász-softmax.

    Args:
        logits: ``(N, C)`` float; labels: ``(N,)`` int64, ``-1`` ignored; class_weights: ``(C,)`` or None.

    Returns: the total loss and its parts ``{"ce", "lovasz"}``.
    """
    ce = weighted_cross_entropy(logits, labels, class_weights)
    lov = lovasz_softmax(logits.float().softmax(1), labels) if lovasz_weight > 0 else logits.sum() * 0.0
    return ce + lovasz_weight * lov, {"ce": ce.detach(), "lovasz": lov.detach()}


def class_aware_contrastive(embedding: Tensor, labels: Tensor, alpha_pos: float = 0.9, alpha_neg: float = 0.5,
                            max_anchors: int = 4096, generator: torch.Generator | None = None) -> Tensor:
    """Class-aware contrastive loss with hardest positives and negatives.

    ``L = mean_a [ max(0, α_p − min_{p: y_p = y_a, p ≠ a} cos(z_a, z_p))
                 + max(0, max_{n: y_n ≠ y_a} cos(z_a, z_n) − α_n) ]``
    over at most ``max_anchors`` labelled anchors drawn without replacement (``generator`` seeds the
    draw); an anchor without a positive (or negative) in the draw contributes no such term.

    Args:
        embedding: ``(M, D)`` float (e.g. per-voxel codes of the inner autoencoder).
        labels: ``(M,)`` int64 class per row, ``-1`` ignored.

    Returns: scalar tensor (0 when fewer than two labelled rows).
    """
    keep = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    if keep.numel() > max_anchors:
        pick = torch.randperm(keep.numel(), generator=generator, device="cpu" if generator is None else generator.device)
        keep = keep[pick[:max_anchors].to(keep.device)]
    if keep.numel() < 2:
        return embedding.sum() * 0.0
    z = F.normalize(embedding[keep].to(torch.promote_types(embedding.dtype, torch.float32)), dim=1)
    y = labels[keep]
    sim = z @ z.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    pos_mask, neg_mask = same & ~eye, ~same
    hardest_pos = torch.where(pos_mask, sim, torch.full_like(sim, 2.0)).min(1).values
    hardest_neg = torch.where(neg_mask, sim, torch.full_like(sim, -2.0)).max(1).values
    pos_term = torch.where(pos_mask.any(1), (alpha_pos - hardest_pos).clamp_min(0), torch.zeros_like(hardest_pos))
    neg_term = torch.where(neg_mask.any(1), (hardest_neg - alpha_neg).clamp_min(0), torch.zeros_like(hardest_neg))
    return (pos_term + neg_term).mean()
