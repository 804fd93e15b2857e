"""threefold: pipelines for LiDAR point clouds, point-cloud pre-training, meshes, brain MRI,
molecules and graphs.

Subpackages (import each on its own; none is imported here, so ``import threefold`` stays cheap):

- :mod:`threefold.datasets`  readers, sample conventions, transforms, collate, splits
- :mod:`threefold.geometry`  point ops, RAPiD-Seg, Point-MAE / I2P-MAE, BSP-Net
- :mod:`threefold.medical`   NestedMorph registration, hierarchical glioma segmentation
- :mod:`threefold.science`   Uni-3DAR octree tokenization and model
- :mod:`threefold.graphs`    GCN baseline, IsoC-VGAE, SelfTask
- :mod:`threefold.pipelines` engine, metrics, configs and the ``threefold`` CLI
"""

__version__ = "0.1.0"
