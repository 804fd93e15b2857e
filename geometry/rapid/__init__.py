"""RAPiD-Seg (Li, Shum, Breckon, ECCV 2024): range-aware pointwise distance distribution features
(:mod:`threefold.geometry.rapid.features`) and their per-scan cache (:mod:`threefold.geometry.rapid.prepare`);
the network (:mod:`~threefold.geometry.rapid.rapidseg`, :mod:`~threefold.geometry.rapid.minkunet`,
:mod:`~threefold.geometry.rapid.vsa`, :mod:`~threefold.geometry.rapid.autoencoder`,
:mod:`~threefold.geometry.rapid.losses`) and spconv on CPU and CUDA (:mod:`~threefold.geometry.rapid.sparse`)."""

from threefold.geometry.rapid.autoencoder import DoubleNestedAutoencoder
from threefold.geometry.rapid.features import NUSCENES_K, SEMANTICKITTI_K, lidar_rings, rapid_features
from threefold.geometry.rapid.losses import class_aware_contrastive, lovasz_softmax
from threefold.geometry.rapid.minkunet import MinkUNet34
from threefold.geometry.rapid.rapidseg import RAPiDSeg

__all__ = [
    "DoubleNestedAutoencoder",
    "MinkUNet34",
    "NUSCENES_K",
    "RAPiDSeg",
    "SEMANTICKITTI_K",
    "class_aware_contrastive",
    "lidar_rings",
    "lovasz_softmax",
    "rapid_features",
]
