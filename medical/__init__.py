"""Medical imaging: volumetric overlap / distance / similarity measures, NestedMorph registration,
hierarchical glioma segmentation."""
