"""Deformable registration: warping with dense displacement fields, diffeomorphic integration,
affine pre-alignment, classical (SimpleITK) baselines and result writing in the fixed image's geometry.

Displacements follow MONAI's ``Warp`` convention everywhere (see :mod:`.warp`): a field ``u`` of shape
``(B, 3, D, H, W)`` in voxels, channel ``i`` along spatial axis ``i``, and ``warped(x) = image(x + u(x))``.
"""

from threefold.medical.registration.warp import compose, identity_grid, integrate_velocity, warp

__all__ = ["compose", "identity_grid", "integrate_velocity", "warp"]
