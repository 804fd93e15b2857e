"""RAPiD-Seg (Li, Shum, Breckon, ECCV 2024): range-aware pointwise distance distribution features
(:mod:`threefold.geometry.rapid.features`) and their per-scan cache (:mod:`threefold.geometry.rapid.prepare`)."""

from threefold.geometry.rapid.features import NUSCENES_K, SEMANTICKITTI_K, lidar_rings, rapid_features

__all__ = ["NUSCENES_K", "SEMANTICKITTI_K", "lidar_rings", "rapid_features"]
