"""Decoders from embeddings to class logits; importing this package registers them."""

from .base import DECODER_REGISTRY, SegmentationDecoder, build_decoder
from .cost_aggregation import CostAggregationDecoder
from .sam_decoder import SAMMaskDecoder
