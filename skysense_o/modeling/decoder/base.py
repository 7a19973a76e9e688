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


# Logit of the classes a decoder leaves out above its class budget (sigmoid of about 4e-44).
DROPPED_CLASS_LOGIT = -100.0


def scatter_selected_classes(
    logits: torch.Tensor, selected: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Place the B x K x H x W logits of the B x K ``selected`` classes on a B x T x H x W
    canvas whose other classes get ``DROPPED_CLASS_LOGIT``.

    The canvas is float32 (as the release allocates it) or the logits' wider dtype.
    """
    batch_size, _, height, width = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    canvas = logits.new_full(
        (batch_size, num_classes, height, width), DROPPED_CLASS_LOGIT, dtype=dtype
    )
    index = selected[:, :, None, None].expand(-1, -1, height, width)
    return canvas.scatter(1, index, logits.to(dtype))


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
