"""Geometry: point ops (FPS, kNN, ball query, Chamfer), RAPiD-Seg, Point-MAE / I2P-MAE, BSP-Net."""
