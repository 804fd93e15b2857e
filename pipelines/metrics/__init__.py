"""The shared metric layer: streaming accumulators (``update`` per batch, ``compute`` at the end)
over the pure functions of the domain packages, built on :class:`torchmetrics.Metric` so that under
DDP every state is **summed** (counts, sums of per-sample values) or **concatenated** (scores) across
ranks before the final value is formed — never averaged per rank. Integer states therefore give the
single-process result exactly, float states to rounding.

Every number carries its convention in its key (``"mIoU[absent=zero]"``, ``"SDlogJ[learn2reg]"``,
``"CD[squared=True,reduction=sum]"``). Feed accumulators only real samples: a
``DistributedSampler`` pads the last round with duplicates, see
:mod:`threefold.pipelines.metrics.distributed`.
"""

from threefold.pipelines.metrics.classification import BinaryRankingMetrics, ClassificationMetrics, MulticlassAccuracy
from threefold.pipelines.metrics.deformation import DeformationMetrics
from threefold.pipelines.metrics.distributed import batch_real_mask, real_sample_mask
from threefold.pipelines.metrics.molecules import MoleculeGenerationMetrics
from threefold.pipelines.metrics.pointsets import PointSetMetrics
from threefold.pipelines.metrics.segmentation import SemanticSegmentationMetrics
from threefold.pipelines.metrics.volume import ImageSimilarityMetrics, SegmentationOverlapMetrics

__all__ = [
    "BinaryRankingMetrics",
    "ClassificationMetrics",
    "DeformationMetrics",
    "ImageSimilarityMetrics",
    "MoleculeGenerationMetrics",
    "MulticlassAccuracy",
    "PointSetMetrics",
    "SegmentationOverlapMetrics",
    "SemanticSegmentationMetrics",
    "batch_real_mask",
    "real_sample_mask",
]
