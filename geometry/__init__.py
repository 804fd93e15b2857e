"""Geometry: point ops (FPS, kNN, ball query, Chamfer), RAPiD-Seg, Point-MAE / I2P-MAE, BSP-Net.

The point ops are re-exported here; the method subpackages are imported on their own.
"""

from threefold.geometry.chamfer import chamfer_distance, fscore, normal_consistency
from threefold.geometry.neighbors import ball_query, group_patches, index_points, knn, knn_indices
from threefold.geometry.rapid.features import lidar_rings, rapid_features
from threefold.geometry.sampling import farthest_point_sampling, farthest_point_sampling_ragged

__all__ = [
    "ball_query",
    "chamfer_distance",
    "farthest_point_sampling",
    "farthest_point_sampling_ragged",
    "fscore",
    "group_patches",
    "index_points",
    "knn",
    "knn_indices",
    "lidar_rings",
    "normal_consistency",
    "rapid_features",
]
