"""Point-MAE (Pang et al., ECCV 2022): patch grouping, masked autoencoder, fine-tuning classifier."""

from threefold.geometry.pointmae.finetune import PointMAEClassifier, max_pooled_features
from threefold.geometry.pointmae.model import (
    PointMAE,
    PointMAEEncoder,
    count_parameters,
    group_points,
    nearest_visible_patch,
    patch_chamfer_l2,
    random_patch_mask,
)

__all__ = [
    "PointMAE",
    "PointMAEClassifier",
    "PointMAEEncoder",
    "count_parameters",
    "group_points",
    "max_pooled_features",
    "nearest_visible_patch",
    "patch_chamfer_l2",
    "random_patch_mask",
]
