"""Vision-language backbones; importing this package registers them."""

from .base import VL_BACKBONE_REGISTRY, DenseFeatures, VisionLanguageBackbone, build_vl_backbone
from .open_clip_backbone import OpenCLIPBackbone
from .skysense_clip import SkySenseCLIPBackbone
