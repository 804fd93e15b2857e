"""Classification and link-prediction accumulators: accuracy, macro-F1, ROC-AUC and average
precision, with scikit-learn's definitions so numbers compare with published tables.

- accuracy: fraction of samples whose predicted class equals the target.
- macro-F1: unweighted mean over classes of ``2 TP / (2 TP + FP + FN)``, over the classes present
  in target or prediction (scikit-learn's ``f1_score(average="macro")`` default label set).
- ROC-AUC (binary): area under the ROC curve, ties between scores counted half (Mann–Whitney U /
  (P N), equal to scikit-learn's trapezoidal ``roc_auc_score``).
- average precision (binary): ``Σ_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds,
  scikit-learn's ``average_precision_score`` (no interpolation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from threefold.datasets.errors import ConfigError, DataFormatError


def _labels(pred: Tensor, target: Tensor, num_classes: int, name: str) -> tuple[Tensor, Tensor]:
    """Predicted class ids from ``(N,)`` labels or ``(N, C)`` scores, checked against ``target (N,)``."""
    if pred.ndim == 2:
        if pred.shape[1] != num_classes:
            raise DataFormatError(f"{name}: scores have {pred.shape[1]} columns; expected num_classes={num_classes}")
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape or target.ndim != 1:
        raise DataFormatError(
            f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)}; "
            "expected (N,) labels or (N, C) scores and (N,) targets"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise DataFormatError(f"{name}: labels have dtypes {pred.dtype}, {target.dtype}; expected integer class ids")
    for what, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataFormatError(
                f"{name}: {what} labels span [{int(labels.min())}, {int(labels.max())}]; expected 0..{num_classes - 1} "
                "(select labelled samples before updating)"
            )
    return pred.long(), target.long()


class MulticlassAccuracy(Metric):
    """Streaming accuracy. States ``correct`` and ``total`` (int64 scalars), reduced by **sum**
    across ranks. ``update(pred, target)`` takes ``(N,)`` int labels (or ``(N, C)`` scores, argmax
    taken); ``compute()`` returns the float64 scalar ``correct / total`` (NaN when empty)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.ndim == 2:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise DataFormatError(
                f"MulticlassAccuracy: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        self.correct += (pred == target).sum().to(self.correct.device)
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.correct.double() / self.total.double()  # NaN when nothing was counted


class ClassificationMetrics(Metric):
    """Streaming multi-class accuracy and macro-F1 from a confusion matrix.

    State: ``confmat`` ``(C, C)`` int64 ``[target, pred]``, reduced by **sum** across ranks (exact).
    ``update(pred, target)``: ``(N,)`` int labels or ``(N, C)`` scores, ``(N,)`` int targets in 0..C-1.
    ``compute()`` returns ``{"accuracy": scalar, "macroF1[present]": scalar}`` (float64), the
    ``[present]`` naming scikit-learn's label set (classes in target or prediction).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ConfigError(f"ClassificationMetrics: num_classes={num_classes}; expected >= 2")
        self.num_classes = num_classes
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        p, t = _labels(pred, target, self.num_classes, "ClassificationMetrics")
        c = self.num_classes
        counts = torch.bincount(t * c + p, minlength=c * c).reshape(c, c)
        self.confmat += counts.to(self.confmat.device)

    def compute(self) -> dict[str, Tensor]:
        conf = self.confmat.double()
        tp = conf.diagonal()
        support = conf.sum(dim=1)
        predicted = conf.sum(dim=0)
        present = (support + predicted) > 0
        f1 = 2 * tp / (support + predicted).clamp_min(1)
        total = conf.sum()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=conf.device)
        return {
            "accuracy": tp.sum() / total if total > 0 else nan,
            "macroF1[present]": f1[present].mean() if present.any() else nan,
        }


def binary_roc_auc(scores: Tensor, target: Tensor) -> Tensor:
    """ROC-AUC of ``(N,)`` float scores against ``(N,)`` {0, 1} targets; ties count half.

    Returns a float64 scalar; NaN when the targets hold only one class (the area is undefined).
    """
    scores, target = _binary_inputs(scores, target, "binary_roc_auc")
    pos = target.sum()
    neg = target.numel() - pos
    if pos == 0 or neg == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    # average ranks of tied scores = mean of the first and last ordinal rank of each tie group
    uniq, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, dim=0).double()
    avg_rank = last - (counts.double() - 1) / 2
    rank_sum_pos = avg_rank[inverse][target.bool()].sum()
    return (rank_sum_pos - pos.double() * (pos.double() + 1) / 2) / (pos.double() * neg.double())


def binary_average_precision(scores: Tensor, target: Tensor) -> Tensor:
    """Average precision ``Σ (R_n - R_{n-1}) P_n`` over distinct thresholds (scikit-learn's).

    Returns a float64 scalar; NaN when there is no positive (recall is undefined).
    """
    scores, target = _binary_inputs(scores, target, "binary_average_precision")
    pos = target.sum()
    if pos == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], target[order].double()
    tps = torch.cumsum(y, dim=0)
    # one threshold per distinct score: the last position of each tie group
    last_of_group = torch.ones_like(s, dtype=torch.bool)
    last_of_group[:-1] = s[1:] != s[:-1]
    tps = tps[last_of_group]
    seen = torch.nonzero(last_of_group).flatten().double() + 1
    precision = tps / seen
    recall = tps / pos.double()
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - recall_prev) * precision).sum()


def _binary_inputs(scores: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if scores.ndim != 1 or scores.shape != target.shape:
        raise DataFormatError(
            f"{name}: scores {tuple(scores.shape)} and target {tuple(target.shape)}; expected equal (N,)"
        )
    if target.numel() and not torch.all((target == 0) | (target == 1)):
        raise DataFormatError(f"{name}: targets hold values other than 0 and 1")
    return scores, target.long()


class BinaryRankingMetrics(Metric):
    """Streaming ROC-AUC and average precision for binary tasks such as link prediction.

    States ``scores`` and ``target``: lists of ``(N,)`` tensors, reduced by **cat** across ranks
    (the ranking needs every score; uneven per-rank lengths are handled by torchmetrics' gather).
    ``update(scores, target)``: ``(N,)`` float scores (logits or probabilities; only the order
    matters) and ``(N,)`` {0, 1} targets. ``compute()`` returns ``{"ROC-AUC": scalar, "AP": scalar}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, target: Tensor) -> None:
        scores, target = _binary_inputs(scores, target, "BinaryRankingMetrics")
        self.scores.append(scores.detach().double())
        self.target.append(target)

    def compute(self) -> dict[str, Tensor]:
        # before a sync the states are lists of tensors, after it one concatenated tensor
        empty = isinstance(self.scores, list) and not self.scores
        scores = torch.zeros(0, dtype=torch.float64) if empty else dim_zero_cat(self.scores).double()
        target = torch.zeros(0, dtype=torch.int64) if empty else dim_zero_cat(self.target).long()
        return {"ROC-AUC": binary_roc_auc(scores, target), "AP": binary_average_precision(scores, target)}
