"""Hierarchical glioma segmentation (Hu et al. 2018, arXiv 1810.09488): the Isensee 2017 residual
U-Net, the multi-level activation head with its softmax and sigmoid baselines, and sliding-window
inference. Only torch is imported here; MONAI is imported inside :mod:`.inference` functions."""

from threefold.medical.segmentation.heads import MultiLevelHead, SigmoidHead, SoftmaxHead, make_head
from threefold.medical.segmentation.multilevel import (
    REGIONS,
    MultiLevelLoss,
    multilevel_activation,
    nesting_violations,
    ordinal_to_regions,
    region_probabilities,
    regions_to_ordinal,
)
from threefold.medical.segmentation.unet import Isensee2017UNet

__all__ = [
    "REGIONS",
    "Isensee2017UNet",
    "MultiLevelHead",
    "MultiLevelLoss",
    "SigmoidHead",
    "SoftmaxHead",
    "make_head",
    "multilevel_activation",
    "nesting_violations",
    "ordinal_to_regions",
    "region_probabilities",
    "regions_to_ordinal",
]
