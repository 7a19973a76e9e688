"""A SAM-style mask decoder: class text embeddings are the prompt tokens of a two-way transformer.

The design follows the mask decoder of "Segment Anything" (Kirillov et al., ICCV 2023) and
reuses its ``TwoWayTransformer``, ``MLP``, ``LayerNorm2d`` and ``PositionEmbeddingRandom`` from
the ``segment_anything`` package.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.logger import log_first_n
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from .base import (
    DECODER_REGISTRY,
    DROPPED_CLASS_LOGIT,
    SegmentationDecoder,
    scatter_selected_classes,
)
from .cost_aggregation import _check_int_pair, _check_positive

# Initial inverse temperature of the dense prior's softmax over classes: the upper bound of
# CLIP's learned logit scale (open_clip 3.3.0's training loop clamps it at ln 100), so that the
# prior starts as sharp as a trained CLIP zero-shot classifier.
PRIOR_SCALE_INIT = 100.0
# Initial scale and bias of the cost term of the logits. With scale 10, a cosine gap of 0.01
# between two classes is a logit gap of 0.1, far above the initial mask logits, while cosines
# in [-1, 1] give logits in [-10, 10], where the sigmoid is not saturated. A saturated start
# slows training: with scale 100, or with bias -10, the 60-step toy training in
# tests/modeling/test_sam_decoder.py stays above the loss of a constant prediction.
COST_SCALE_INIT = 10.0
COST_BIAS_INIT = 0.0
# Standard deviation of the last hypernetwork layer's initial weights. It is small, so the
# learned mask logits start far below the cost term and an untrained decoder ranks classes
# like the CLIP similarity. It is not zero, because zero weights would block the gradient of
# the whole image path at the first step.
HYPERNET_INIT_STD = 1e-4
# SAM's TwoWayTransformer halves the width inside its cross-attention layers.
SAM_ATTENTION_DOWNSAMPLE_RATE = 2


def _check_transformer_sizes(
    embed_dim: int, hidden_dim: int, depth: int, num_heads: int, mlp_dim: int, class_chunk: int
) -> None:
    """Raise ValueError, naming the config key, on sizes that SAMMaskDecoder cannot use."""
    _check_positive(
        {
            "embed_dim (backbone.embed_dim)": embed_dim,
            "hidden_dim (MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM)": hidden_dim,
            "depth (MODEL.SKYSENSE_O.DECODER.SAM_DEPTH)": depth,
            "num_heads (MODEL.SKYSENSE_O.DECODER.SAM_NUM_HEADS)": num_heads,
            "mlp_dim (MODEL.SKYSENSE_O.DECODER.SAM_MLP_DIM)": mlp_dim,
            "class_chunk (MODEL.SKYSENSE_O.DECODER.SAM_CLASS_CHUNK)": class_chunk,
        }
    )
    if hidden_dim % (SAM_ATTENTION_DOWNSAMPLE_RATE * num_heads) != 0:
        raise ValueError(
            f"hidden_dim (MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM) = {hidden_dim} must be a "
            f"multiple of {SAM_ATTENTION_DOWNSAMPLE_RATE} x num_heads "
            f"(MODEL.SKYSENSE_O.DECODER.SAM_NUM_HEADS = {num_heads}), because SAM's "
            f"cross-attention splits hidden_dim / {SAM_ATTENTION_DOWNSAMPLE_RATE} channels "
            "into the heads"
        )


@DECODER_REGISTRY.register()
class SAMMaskDecoder(SegmentationDecoder):
    """Mask decoder with one prompt token per class and a cost-volume prior.

    It applies the two-way transformer of "Segment Anything" (Kirillov et al., ICCV 2023) to
    open-vocabulary segmentation:

    1. The cost volume is the cosine similarity between the image embedding and each class's
       text embedding (the normalised mean over the prompt channels), B x T x h x w.
    2. An MLP projects each class embedding to a token of the transformer width D.
    3. The image side is the image embedding projected by a 1x1 conv, plus a dense prior: at
       every cell, the class tokens averaged with the weights softmax over classes of the
       scaled cost. The prior has D channels whatever T is.
    4. The class tokens and the image side go through SAM's ``TwoWayTransformer``, in chunks of
       ``class_chunk`` classes that all start from the same image side. Each chunk is
       upscaled (step 5) on its own, because each chunk updates its own copy of the image side.
    5. Two stride-2 transposed convs upscale the image side 4x, fusing the coarse and then the
       fine guidance map (each after a 1x1 conv), with LayerNorm2d and GELU.
    6. A hypernetwork MLP maps each class token to weights whose dot product with the upscaled
       map is the class's mask logit.
    7. The bilinearly upsampled cost, times a learned scale, plus a learned bias, is added to
       every class's logit. The hypernetwork's initial weights are small, so an untrained
       decoder ranks classes as the backbone's cosine similarity does.

    With more than ``class_budget`` classes, each image decodes only the ``class_budget``
    classes of highest maximum cost over its cells (in vocabulary order), as the
    cost-aggregation decoder does. The other classes get the logit -100, and the dense prior
    averages over the decoded classes only.

    Memory and compute grow linearly with the number of decoded classes. The transformer's
    attention maps are K x (h*w) for a chunk of K classes, and the K x K token self-attention
    is bounded by the chunk size. Above the class budget, only the B x T x h x w cost volume
    and the B x T x 4h x 4w output grow with T.

    NOTE: class tokens attend to each other only inside their chunk, and each chunk updates
    its own copy of the image side. So when T exceeds ``class_chunk``, a class's logits depend
    on which classes share its chunk, so on the chunk size and on the order of the vocabulary.
    Classes of different chunks interact only through the dense prior and the shared cost.

    The ``appearance`` guidance of the decoder interface is the dense embedding itself, which
    this decoder already receives as ``image_embeds``, so it is not read.
    """

    @configurable
    def __init__(
        self,
        *,
        embed_dim: int,
        guidance_channels: Sequence[int],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        upsample_dims: Sequence[int],
        class_chunk: int,
        class_budget: Optional[int] = None,
    ) -> None:
        """
        Args:
            embed_dim: width E of the backbone's joint embedding space.
            guidance_channels: channels (G0, G1) of the coarse and fine guidance maps.
            hidden_dim: width D of the two-way transformer. It must be a multiple of
                2 * num_heads, because SAM's cross-attention halves the width before
                splitting it into heads.
            depth: number of two-way attention blocks.
            num_heads: attention heads in every attention layer.
            mlp_dim: hidden width of the MLP in each two-way block.
            upsample_dims: channels (U0, U1) after the first and second 2x upscaling.
            class_chunk: number of class tokens the transformer attends over at once.
            class_budget: most classes decoded per image (the top ones by maximum cost);
                None decodes every class.
        """
        super().__init__()
        _check_transformer_sizes(embed_dim, hidden_dim, depth, num_heads, mlp_dim, class_chunk)
        if class_budget is not None:
            _check_positive({"class_budget (MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET)": class_budget})
        coarse_channels, fine_channels = _check_int_pair(
            "guidance_channels (MODEL.SKYSENSE_O.DECODER.GUIDANCE_CHANNELS)", guidance_channels
        )
        coarse_dim, fine_dim = _check_int_pair(
            "upsample_dims (MODEL.SKYSENSE_O.DECODER.UPSAMPLE_DIMS)", upsample_dims
        )
        self.embed_dim = embed_dim
        self.guidance_channels = (coarse_channels, fine_channels)
        self.class_chunk = class_chunk
        self.class_budget = class_budget

        # Prompt side: class embeddings to tokens. Image side: embedding to width D, the
        # learned log inverse temperature of the dense prior, and SAM's random-frequency
        # positional encoding. Scales are learned as logarithms, like CLIP's logit scale, so
        # they stay positive and an optimiser changes them by ratios.
        self.text_proj = MLP(embed_dim, hidden_dim, hidden_dim, 2)
        self.image_proj = nn.Sequential(
            nn.Conv2d(embed_dim, hidden_dim, 1), LayerNorm2d(hidden_dim)
        )
        self.prior_log_scale = nn.Parameter(torch.tensor(math.log(PRIOR_SCALE_INIT)))
        self.pe_layer = PositionEmbeddingRandom(hidden_dim // 2)
        self.transformer = TwoWayTransformer(
            depth=depth,
            embedding_dim=hidden_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            attention_downsample_rate=SAM_ATTENTION_DOWNSAMPLE_RATE,
        )

        # Output: 4x upscaling fused with the guidance maps, then per-class hypernetwork weights.
        self.coarse_proj = nn.Conv2d(coarse_channels, coarse_dim, 1)
        self.fine_proj = nn.Conv2d(fine_channels, fine_dim, 1)
        self.upscale_coarse = nn.ConvTranspose2d(hidden_dim, coarse_dim, kernel_size=2, stride=2)
        self.norm_coarse = LayerNorm2d(coarse_dim)
        self.upscale_fine = nn.ConvTranspose2d(coarse_dim, fine_dim, kernel_size=2, stride=2)
        self.norm_fine = LayerNorm2d(fine_dim)
        self.activation = nn.GELU()
        self.hypernet = MLP(hidden_dim, hidden_dim, fine_dim, 3)
        nn.init.normal_(self.hypernet.layers[-1].weight, std=HYPERNET_INIT_STD)
        nn.init.zeros_(self.hypernet.layers[-1].bias)

        # The zero-shot term: logit += exp(cost_log_scale) * cosine + cost_bias.
        self.cost_log_scale = nn.Parameter(torch.tensor(math.log(COST_SCALE_INIT)))
        self.cost_bias = nn.Parameter(torch.tensor(COST_BIAS_INIT))

    @classmethod
    def from_config(cls, cfg, backbone) -> Dict[str, object]:
        embed_dim = getattr(backbone, "embed_dim", None)
        if embed_dim is None:
            raise TypeError(
                f"SAMMaskDecoder needs a backbone with an embed_dim attribute, got a "
                f"{type(backbone).__name__}"
            )
        decoder_cfg = cfg.MODEL.SKYSENSE_O.DECODER
        return {
            "embed_dim": embed_dim,
            "guidance_channels": list(decoder_cfg.GUIDANCE_CHANNELS),
            "hidden_dim": decoder_cfg.HIDDEN_DIM,
            "depth": decoder_cfg.SAM_DEPTH,
            "num_heads": decoder_cfg.SAM_NUM_HEADS,
            "mlp_dim": decoder_cfg.SAM_MLP_DIM,
            "upsample_dims": list(decoder_cfg.UPSAMPLE_DIMS),
            "class_chunk": decoder_cfg.SAM_CLASS_CHUNK,
            "class_budget": decoder_cfg.CLASS_BUDGET,
        }

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> torch.Tensor:
        """Predict one logit map per class.

        Args:
            image_embeds: B x E x h x w dense image embedding (not normalised).
            text_embeds: B x T x P x E L2-normalised class-text embeddings, P prompt channels.
            guidance: ``[appearance, coarse, fine]``, shaped B x E x h x w (not read),
                B x G0 x 2h x 2w and B x G1 x 4h x 4w.

        Returns:
            B x T x 4h x 4w class logits. Classes outside an image's class budget get -100.
        """
        coarse, fine = self._check_inputs(image_embeds, text_embeds, guidance)

        # Cost volume against the prompt-ensembled class embeddings (normalised mean over P).
        class_embeds = F.normalize(text_embeds.mean(dim=2), dim=-1).to(image_embeds)  # B x T x E
        cost = torch.einsum("behw,bte->bthw", F.normalize(image_embeds, dim=1), class_embeds)

        # Over budget: decode each image's top classes only.
        selected = self.select_classes(cost)
        if selected is None:
            return self._decode_classes(image_embeds, cost, class_embeds, coarse, fine)
        num_classes = cost.shape[1]
        log_first_n(
            logging.INFO,
            f"{num_classes} classes exceed the SAM decoder's class budget of "
            f"{self.class_budget}: each image decodes its top {self.class_budget} classes by "
            f"cost, the others get logit {DROPPED_CLASS_LOGIT}",
            n=1,
            name=__name__,
        )
        class_embeds = torch.gather(
            class_embeds, 1, selected[:, :, None].expand(-1, -1, class_embeds.shape[-1])
        )
        cost = torch.gather(cost, 1, selected[:, :, None, None].expand(-1, -1, *cost.shape[-2:]))
        logits = self._decode_classes(image_embeds, cost, class_embeds, coarse, fine)
        return scatter_selected_classes(logits, selected, num_classes)

    def select_classes(self, cost: torch.Tensor) -> Optional[torch.Tensor]:
        """Return the B x class_budget indices, ascending, of each image's classes of highest
        maximum cost over cells, or None when the B x T x h x w ``cost`` is within budget.

        Ascending indices keep the vocabulary order, which decides the chunks.
        """
        if self.class_budget is None or cost.shape[1] <= self.class_budget:
            return None
        best_cost = cost.amax(dim=(2, 3))  # B x T
        selected = best_cost.topk(self.class_budget, dim=1, sorted=False).indices
        return selected.sort(dim=1).values

    def _decode_classes(
        self,
        image_embeds: torch.Tensor,
        cost: torch.Tensor,
        class_embeds: torch.Tensor,
        coarse: torch.Tensor,
        fine: torch.Tensor,
    ) -> torch.Tensor:
        """Return the B x K x 4h x 4w logits of K classes from their B x K x h x w cost and
        B x K x E normalised embeddings."""
        batch_size, _, height, width = image_embeds.shape

        # Prompt tokens and the image side shared by every chunk.
        class_tokens = self.text_proj(class_embeds)  # B x K x D
        image_side = self._embed_image(image_embeds, cost, class_tokens)  # B x D x h x w
        image_pe = self.pe_layer((height, width)).to(image_side)
        image_pe = image_pe.unsqueeze(0).expand(batch_size, -1, -1, -1)
        coarse_guidance = self.coarse_proj(coarse)  # B x U0 x 2h x 2w
        fine_guidance = self.fine_proj(fine)  # B x U1 x 4h x 4w

        # Chunks of classes through the transformer; see the NOTE in the class docstring.
        mask_logits = torch.cat(
            [
                self._decode_chunk(image_side, image_pe, tokens, coarse_guidance, fine_guidance)
                for tokens in class_tokens.split(self.class_chunk, dim=1)
            ],
            dim=1,
        )  # B x K x 4h x 4w

        # The zero-shot term keeps the backbone's ranking of classes.
        cost_up = F.interpolate(
            cost, size=mask_logits.shape[-2:], mode="bilinear", align_corners=False
        )
        return mask_logits + self.cost_log_scale.exp() * cost_up + self.cost_bias

    def _embed_image(
        self, image_embeds: torch.Tensor, cost: torch.Tensor, class_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Return the B x D x h x w image side: projected embedding plus the dense cost prior.

        The prior is a per-cell average of the B x T x D class tokens, weighted by the softmax
        over classes of the B x T x h x w cost. It costs O(T * h * w * D) and has no T axis.
        """
        class_weights = torch.softmax(self.prior_log_scale.exp() * cost, dim=1)  # B x T x h x w
        prior = torch.einsum("bthw,btd->bdhw", class_weights, class_tokens)
        return self.image_proj(image_embeds) + prior

    def _decode_chunk(
        self,
        image_side: torch.Tensor,
        image_pe: torch.Tensor,
        class_tokens: torch.Tensor,
        coarse_guidance: torch.Tensor,
        fine_guidance: torch.Tensor,
    ) -> torch.Tensor:
        """Return the B x K x 4h x 4w mask logits of a B x K x D chunk of class tokens."""
        batch_size, hidden_dim, height, width = image_side.shape
        token_out, image_out = self.transformer(image_side, image_pe, class_tokens)

        # The transformer returns the image side as B x (h*w) x D tokens.
        image_out = image_out.transpose(1, 2).reshape(batch_size, hidden_dim, height, width)
        upscaled = self._upscale(image_out, coarse_guidance, fine_guidance)  # B x U1 x 4h x 4w
        mask_weights = self.hypernet(token_out)  # B x K x U1
        return torch.einsum("bkc,bchw->bkhw", mask_weights, upscaled)

    def _upscale(
        self, image_out: torch.Tensor, coarse_guidance: torch.Tensor, fine_guidance: torch.Tensor
    ) -> torch.Tensor:
        """Upscale a B x D x h x w map to B x U1 x 4h x 4w, fusing both guidance maps."""
        upscaled = self.upscale_coarse(image_out) + coarse_guidance
        upscaled = self.activation(self.norm_coarse(upscaled))
        upscaled = self.upscale_fine(upscaled) + fine_guidance
        return self.activation(self.norm_fine(upscaled))

    def _check_inputs(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the coarse and fine guidance maps, or raise ValueError on invalid shapes."""
        if image_embeds.dim() != 4 or image_embeds.shape[1] != self.embed_dim:
            raise ValueError(
                f"image_embeds must be B x {self.embed_dim} x h x w, got "
                f"{tuple(image_embeds.shape)}"
            )
        batch_size, _, height, width = image_embeds.shape
        if (
            text_embeds.dim() != 4
            or text_embeds.shape[0] != batch_size
            or text_embeds.shape[3] != self.embed_dim
        ):
            raise ValueError(
                f"text_embeds must be {batch_size} x T x P x {self.embed_dim} to match "
                f"image_embeds {tuple(image_embeds.shape)}, got {tuple(text_embeds.shape)}"
            )
        if text_embeds.shape[1] == 0 or text_embeds.shape[2] == 0:
            raise ValueError(
                f"text_embeds needs at least one class and one prompt channel, got "
                f"{tuple(text_embeds.shape)}"
            )
        if len(guidance) != 3:
            raise ValueError(
                f"guidance must be [appearance, coarse, fine], got {len(guidance)} maps"
            )
        for tensor, channels, scale, name in zip(
            guidance[1:], self.guidance_channels, (2, 4), ("coarse", "fine")
        ):
            expected = (batch_size, channels, scale * height, scale * width)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{name} guidance must be {expected} for image_embeds "
                    f"{tuple(image_embeds.shape)}, got {tuple(tensor.shape)}"
                )
        return guidance[1], guidance[2]
