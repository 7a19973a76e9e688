"""Model components; importing this package registers them."""

from . import backbone, decoder, meta_arch
from .backbone.base import VL_BACKBONE_REGISTRY, VisionLanguageBackbone, build_vl_backbone
from .decoder.base import DECODER_REGISTRY, SegmentationDecoder, build_decoder
from .text_embeddings import TextEmbedder
from .meta_arch import SkySenseO, SkySenseOHead
