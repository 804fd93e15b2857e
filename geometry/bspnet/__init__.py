"""BSP-Net (Chen, Tagliasacchi and Zhang, CVPR 2020): compact polygonal meshes from binary space
partitioning. The model and its per-phase losses, exact mesh extraction by half-space intersection,
mesh export and the paper's surface-sampling evaluation protocol."""
