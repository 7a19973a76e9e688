"""The registry of decoders that turn image and text embeddings into per-class logits."""

from typing import List

import torch
from detectron2.utils.registry import Registry
from torch import nn

DECODER_REGISTRY = Registry("SKYSENSE_O_DECODER")
DECODER_REGISTRY.__doc__ = """
Registry of SkySense-O decoders. A registered class is built through its ``@configurable``
``from_config(cfg, backbone)`` and must subclass ``SegmentationDecoder``.
"""


class SegmentationDecoder(nn.Module):
    """Maps image and class-text embeddings to one logit map per class.

    ``forward(image_embeds, text_embeds, guidance)`` takes:

    * ``image_embeds``: B x E x h x w dense image embedding (not normalised);
    * ``text_embeds``: B x T x P x E class-text embeddings, L2-normalised, with P prompt
      channels (templates);
    * ``guidance``: ``[appearance, coarse, fine]`` where ``appearance`` is B x E x h x w
      (the dense embedding), ``coarse`` is B x G0 x 2h x 2w and ``fine`` is B x G1 x 4h x 4w
      (G = ``MODEL.SKYSENSE_O.DECODER.GUIDANCE_CHANNELS``);

    and returns B x T x 4h x 4w class logits. Classes that a decoder does not evaluate
    (above its class budget) get a logit of -100.
    """

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError


def build_decoder(cfg, backbone) -> SegmentationDecoder:
    """Build the decoder named by ``cfg.MODEL.SKYSENSE_O.DECODER.NAME`` for ``backbone``."""
    name = cfg.MODEL.SKYSENSE_O.DECODER.NAME
    if name not in DECODER_REGISTRY:
        raise KeyError(
            f"MODEL.SKYSENSE_O.DECODER.NAME={name!r} is not registered; registered decoders: "
            f"{', '.join(sorted(name for name, _ in DECODER_REGISTRY))}"
        )
    decoder = DECODER_REGISTRY.get(name)(cfg, backbone)
    if not isinstance(decoder, SegmentationDecoder):
        raise TypeError(f"{name} built a {type(decoder).__name__}, not a SegmentationDecoder")
    return decoder
