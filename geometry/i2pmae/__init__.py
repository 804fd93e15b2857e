"""I2P-MAE (Zhang et al., CVPR 2023): hierarchical encoder, multi-view depth projection, frozen 2D
teachers, 2D-guided masking, pretraining model and fine-tuning classifier."""

from threefold.geometry.i2pmae.classifier import I2PMAEClassifier, i2pmae_features
from threefold.geometry.i2pmae.encoder import FeaturePropagation, HierarchicalEncoder, Scale, hierarchical_groups
from threefold.geometry.i2pmae.masking import center_saliency, guided_mask, propagate_mask
from threefold.geometry.i2pmae.model import I2PMAE, nearest_visible_members
from threefold.geometry.i2pmae.projection import project_depth, project_views, sample_view_map
from threefold.geometry.i2pmae.teacher import CLIPVisionTeacher, Teacher2D, load_clip_teacher, random_teacher

__all__ = [
    "CLIPVisionTeacher",
    "FeaturePropagation",
    "HierarchicalEncoder",
    "I2PMAE",
    "I2PMAEClassifier",
    "Scale",
    "Teacher2D",
    "center_saliency",
    "guided_mask",
    "hierarchical_groups",
    "i2pmae_features",
    "load_clip_teacher",
    "nearest_visible_members",
    "project_depth",
    "project_views",
    "propagate_mask",
    "random_teacher",
    "sample_view_map",
]
