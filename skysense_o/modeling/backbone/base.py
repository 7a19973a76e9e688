"""The interface every vision-language backbone implements, and the registry that builds them."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

VL_BACKBONE_REGISTRY = Registry("VL_BACKBONE")
VL_BACKBONE_REGISTRY.__doc__ = """
Registry of vision-language (CLIP-style) backbones. A registered class is built as
``cls(cfg)`` or through its ``@configurable`` ``from_config(cfg)`` and must subclass
``VisionLanguageBackbone``.
"""


@dataclass
class DenseFeatures:
    """Dense outputs of a backbone's image tower for a batch of B images.

    Attributes:
        embedding: B x E x h x w image embedding in the joint vision-language space (not
            normalised), at ``VisionLanguageBackbone.dense_stride``.
        guidance: two feature maps from earlier layers, coarse then fine, shaped
            B x C_i x h_i x w_i with C_i = ``guidance_channels[i]`` and stride
            ``guidance_strides[i]`` relative to the input image.
    """

    embedding: torch.Tensor
    guidance: List[torch.Tensor]


class VisionLanguageBackbone(nn.Module):
    """A CLIP-style model: a dense image tower and a text tower with a shared embedding space.

    Subclasses set the attributes below in ``__init__`` and implement the methods. Images
    given to ``encode_dense`` and ``encode_pooled`` are already normalised with
    ``pixel_mean`` and ``pixel_std`` (0..255 units, RGB).
    """

    #: Width E of the joint embedding space.
    embed_dim: int
    #: Stride of ``DenseFeatures.embedding`` relative to the input image.
    dense_stride: int
    #: Channels and strides of the two guidance maps, coarse then fine.
    guidance_channels: Tuple[int, int]
    guidance_strides: Tuple[int, int]
    #: Normalisation the weights were trained with, RGB in 0..255 units.
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]

    def encode_dense(self, images: torch.Tensor) -> DenseFeatures:
        """Return the dense embedding and guidance maps of B x 3 x H x W normalised images."""
        raise NotImplementedError

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Return one B x E embedding per image (not normalised), for image-level tasks."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the N x L int64 token ids of ``texts`` on the backbone's device."""
        raise NotImplementedError

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Return N x E text embeddings (not normalised) for N x L token ids."""
        raise NotImplementedError

    def text_parameters(self) -> List[nn.Parameter]:
        """Return the parameters of the text tower (used to key the text-embedding cache)."""
        raise NotImplementedError

    def set_finetune(self, visual_mode: str, text_mode: str) -> None:
        """Set ``requires_grad`` of both towers: "frozen", "attention" or "full"."""
        raise NotImplementedError


FINETUNE_MODES = ("frozen", "attention", "full")


def check_finetune_mode(mode: str, tower: str) -> None:
    """Raise ValueError unless ``mode`` is one of FINETUNE_MODES."""
    if mode not in FINETUNE_MODES:
        raise ValueError(
            f"invalid fine-tune mode {mode!r} for the {tower} tower; expected one of "
            f"{', '.join(FINETUNE_MODES)}"
        )


def build_vl_backbone(cfg) -> VisionLanguageBackbone:
    """Build the backbone named by ``cfg.MODEL.SKYSENSE_O.BACKBONE.NAME``."""
    name = cfg.MODEL.SKYSENSE_O.BACKBONE.NAME
    if name not in VL_BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.SKYSENSE_O.BACKBONE.NAME={name!r} is not registered; registered backbones: "
            f"{', '.join(sorted(name for name, _ in VL_BACKBONE_REGISTRY))}"
        )
    backbone = VL_BACKBONE_REGISTRY.get(name)(cfg)
    if not isinstance(backbone, VisionLanguageBackbone):
        raise TypeError(f"{name} built a {type(backbone).__name__}, not a VisionLanguageBackbone")
    return backbone
