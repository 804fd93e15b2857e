"""Semantic segmentation accumulator: confusion matrix, per-class IoU, mIoU and overall accuracy,
following the official SemanticKITTI evaluator (Behley et al., ICCV 2019; semantic-kitti-api
``auxiliary/np_ioueval.py``).

Rules (ignore index is -1 package-wide):

- points whose ground truth is -1 are removed before counting;
- a point predicted as -1 counts as a false negative of its true class (and as no class's false
  positive), exactly as ``np_ioueval`` does for a prediction of its ignored class;
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; a class absent from both ground truth and prediction has
  union 0 and IoU 0 (``np_ioueval`` divides by ``union + 1e-15``).

mIoU conventions, named in every key that carries a number:

- ``absent="zero"`` (default, reported for benchmarks; ``np_ioueval``): mean over all classes, an
  absent class contributing 0;
- ``absent="skip"``: mean over the classes present in ground truth or prediction (union > 0).

Overall accuracy is ``Σ TP / #points with non-ignored ground truth``, so a point predicted as -1 is
an error. ``np_ioueval.getacc`` leaves such points out of the denominator (it sums TP + FP over the
included classes only), which would reward predicting "ignored"; the two agree whenever no point is
predicted -1, which is the case for every model in this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from threefold.datasets.errors import ConfigError, DataFormatError

IGNORE_INDEX = -1
ABSENT_CONVENTIONS = ("zero", "skip")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Confusion counts of labels in ``[-1, num_classes)``.

    Args:
        pred: ``(N,)`` (or any shape) int predicted labels, -1 allowed (counted as a miss).
        target: int ground-truth labels of the same shape, -1 = ignored (removed).
        num_classes: C.

    Returns:
        ``(C, C + 1)`` int64 on ``target``'s device: ``[true class, predicted class]``, the last column
        counting points predicted -1.
    """
    if pred.shape != target.shape:
        raise DataFormatError(f"confusion_matrix: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise DataFormatError(
            f"confusion_matrix: labels have dtypes {pred.dtype}, {target.dtype}; expected integer class ids "
            "(take argmax of scores first)"
        )
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < IGNORE_INDEX or labels.max() >= num_classes):
            raise DataFormatError(
                f"confusion_matrix: {name} labels span [{int(labels.min())}, {int(labels.max())}]; expected "
                f"-1 (ignored) or 0..{num_classes - 1}"
            )
    width = num_classes + 1
    # a -1 prediction lands in column C; an ignored target in one extra bin that is cut off
    # (cheaper than boolean indexing, which copies)
    p = pred.reshape(-1).long().remainder(width)
    t = target.reshape(-1).long()
    flat = torch.where(t == IGNORE_INDEX, num_classes * width, t * width + p)
    counts = torch.bincount(flat, minlength=num_classes * width + 1)
    return counts[:-1].reshape(num_classes, width)


def iou_from_confusion(conf: Tensor, absent: str = "zero") -> tuple[Tensor, Tensor]:
    """Per-class IoU and mIoU from a :func:`confusion_matrix` ``(C, C + 1)``.

    Returns:
        ``(C,)`` float64 IoU (0 for a class absent from ground truth and prediction) and the scalar
        mIoU under ``absent`` ("zero": mean over all C; "skip": over classes with union > 0; NaN
        when no class is present).
    """
    if absent not in ABSENT_CONVENTIONS:
        raise ConfigError(f"iou_from_confusion: absent={absent!r}; expected one of {ABSENT_CONVENTIONS}")
    c = conf.shape[0]
    conf = conf.double()
    tp = conf.diagonal()
    fn = conf.sum(dim=1) - tp  # includes points predicted -1
    fp = conf[:, :c].sum(dim=0) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
    miou = iou.mean() if absent == "zero" else iou[union > 0].mean()
    return iou, miou


class SemanticSegmentationMetrics(Metric):
    """Streaming SemanticKITTI-style evaluation.

    State: ``confmat`` ``(C, C + 1)`` int64 (see :func:`confusion_matrix`), reduced across ranks by
    **sum**, so a distributed result equals the single-process one exactly.

    ``update(pred, target)``: int labels of any (equal) shape, e.g. ``(N,)`` points of a batch;
    feed only real samples (see :mod:`threefold.pipelines.metrics.distributed`).

    ``compute()`` returns ``{"mIoU[absent=<absent>]": scalar, "accuracy[overall]": scalar,
    "IoU/<class name>": scalar, ...}`` (float64; IoU values in [0, 1]).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, absent: str = "zero", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"SemanticSegmentationMetrics: num_classes={num_classes}; expected >= 1")
        if absent not in ABSENT_CONVENTIONS:
            raise ConfigError(f"SemanticSegmentationMetrics: absent={absent!r}; expected one of {ABSENT_CONVENTIONS}")
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(
                f"SemanticSegmentationMetrics: {len(names)} class_names for num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.class_names = names
        self.absent = absent
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes + 1, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.confmat += confusion_matrix(pred, target, self.num_classes).to(self.confmat.device)

    def compute(self) -> dict[str, Tensor]:
        iou, miou = iou_from_confusion(self.confmat, self.absent)
        valid = self.confmat.sum()
        acc = self.confmat.diagonal().sum().double() / valid.double()  # NaN when nothing was counted
        out = {f"mIoU[absent={self.absent}]": miou, "accuracy[overall]": acc}
        out.update({f"IoU/{name}": v for name, v in zip(self.class_names, iou)})
        return out
