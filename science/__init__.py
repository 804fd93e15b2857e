"""Science: Uni-3DAR octree tokenization of molecules, crystals and proteins, and its model."""
