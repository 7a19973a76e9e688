"""The cost-aggregation decoder of the SkySense-O release (the CAT-Seg design).

The design is that of "CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic Segmentation"
(Cho et al., CVPR 2024). The module and parameter names follow the SkySense-O release, whose
checkpoints store this decoder under ``sem_seg_head.transformer.``: a release state dict with
that prefix removed loads strictly into ``CostAggregationDecoder``.
"""

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.logger import log_first_n
from einops import rearrange, repeat
from timm.layers import Mlp
from torch import nn

from .base import (
    DECODER_REGISTRY,
    DROPPED_CLASS_LOGIT,
    SegmentationDecoder,
    scatter_selected_classes,
)

# Additive attention bias between tokens of different shift regions of a window. The release
# uses -100 (not -inf) and stores the mask in its checkpoints, so the value is kept.
SHIFT_MASK_VALUE = -100.0
# Logit of the classes above the class budget, which the decoder does not evaluate.
# Added to the denominator of the linear attention, as in the release.
LINEAR_ATTENTION_EPS = 1e-6
# Hidden width of every MLP in the aggregation layers, as a multiple of the hidden width.
MLP_RATIO = 4
# GroupNorm of the upsampling blocks: one group per this many channels (rounded down).
CHANNELS_PER_GROUP = 16
# Each block caches the attention masks of sizes other than the configured one. The cache
# keeps the most recently used entries, at most this many, so varying image sizes cannot grow
# it without bound.
MASK_CACHE_ENTRIES = 8


def effective_window(height: int, width: int, window: int, shift: int) -> Tuple[int, int]:
    """Return the (window, shift) that a Swin block uses on an h x w map.

    As in the release's Swin blocks, a map whose shorter side is at most ``window`` is
    covered by windows of that side and not shifted.
    """
    if min(height, width) <= window:
        return min(height, width), 0
    return window, shift


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> Optional[torch.Tensor]:
    """Build the additive attention mask of (shifted) window attention on an h x w map.

    The map is padded at the bottom and right to multiples of ``window``, then rolled by
    (-shift, -shift). Tokens of one window that come from different regions of the rolled map
    (the classic 3 x 3 split at ``-window`` and ``-shift``) get ``SHIFT_MASK_VALUE``. Padded
    tokens form a region of their own, so real tokens never attend to them. The release never
    pads, and without padding the mask equals the release's.

    Returns:
        nW x w² x w² float32 mask (nW windows, row-major over the window grid), or None when
        there is neither a shift nor padding.
    """
    pad_height, pad_width = (-height) % window, (-width) % window
    if shift == 0 and pad_height == 0 and pad_width == 0:
        return None
    padded_height, padded_width = height + pad_height, width + pad_width

    # Region labels in the rolled frame: 0, 1, 2 along each axis, combined to 0..8.
    def axis_regions(size: int) -> torch.Tensor:
        index = torch.arange(size)
        regions = torch.zeros(size, dtype=torch.long)
        if shift > 0:
            regions = (index >= size - window).long() + (index >= size - shift).long()
        return regions

    labels = axis_regions(padded_height)[:, None] * 3 + axis_regions(padded_width)[None, :]

    # Rolled position r contains the token of position (r + shift) mod size of the padded map.
    rows = (torch.arange(padded_height) + shift) % padded_height
    cols = (torch.arange(padded_width) + shift) % padded_width
    is_padding = (rows[:, None] >= height) | (cols[None, :] >= width)
    labels = torch.where(is_padding, torch.full_like(labels, -1), labels)

    windows = rearrange(labels, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window, ww=window)
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * SHIFT_MASK_VALUE


class GuidedWindowAttention(nn.Module):
    """Window multi-head attention whose queries and keys also see a guidance map.

    Queries and keys are projected from the tokens concatenated with their guidance, values
    from the tokens alone. There is no relative position bias.
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, windows: torch.Tensor, num_windows: int, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attend within each window.

        Args:
            windows: (N nW) x L x (C + G) tokens concatenated with their guidance, windows of
                one map consecutive.
            num_windows: nW, the windows per map.
            mask: nW x L x L additive mask, or None.

        Returns:
            (N nW) x L x C attention output after the output projection.
        """
        # Windows and heads share one batch axis, so one nW*heads x L x L mask serves all maps.
        split = "(n w) l (h d) -> n (w h) l d"
        heads = {"w": num_windows, "h": self.num_heads}
        query = rearrange(self.q(windows), split, **heads)
        key = rearrange(self.k(windows), split, **heads)
        value = rearrange(self.v(windows[..., : self.dim]), split, **heads)
        if mask is not None:
            mask = repeat(mask, "w i j -> 1 (w h) i j", h=self.num_heads).to(query.dtype)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.proj(rearrange(attended, "n (w h) l d -> (n w) l (h d)", **heads))


class GuidedSwinBlock(nn.Module):
    """A pre-norm block of "Swin Transformer: Hierarchical Vision Transformer using Shifted
    Windows" (Liu et al., ICCV 2021) whose attention is guided by appearance features.

    ``attn_mask`` is the persistent mask for ``feature_resolution``, present only when that
    size is shifted, so that release checkpoints load. Other sizes get a mask built on first
    use.
    """

    def __init__(
        self,
        *,
        dim: int,
        guidance_dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        feature_resolution: Tuple[int, int],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.feature_resolution = tuple(feature_resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=dim * MLP_RATIO)

        window, shift = effective_window(*self.feature_resolution, window_size, shift_size)
        configured_mask = None
        if shift > 0:
            configured_mask = shifted_window_mask(*self.feature_resolution, window, shift)
        self.register_buffer("attn_mask", configured_mask)
        self._mask_cache: "OrderedDict[tuple, Optional[torch.Tensor]]" = OrderedDict()

    def _mask_for(
        self, height: int, width: int, window: int, shift: int, device: torch.device
    ) -> Optional[torch.Tensor]:
        """Return the attention mask for an h x w map, from the buffer or the cache."""
        if (height, width) == self.feature_resolution and self.attn_mask is not None:
            return self.attn_mask
        cache_key = (height, width, window, shift, str(device))
        if cache_key in self._mask_cache:
            self._mask_cache.move_to_end(cache_key)
            return self._mask_cache[cache_key]
        mask = shifted_window_mask(height, width, window, shift)
        if mask is not None:
            mask = mask.to(device)
        self._mask_cache[cache_key] = mask
        if len(self._mask_cache) > MASK_CACHE_ENTRIES:
            self._mask_cache.popitem(last=False)
        return mask

    def forward(
        self, tokens: torch.Tensor, guidance: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Apply the block to N maps of h x w tokens.

        Args:
            tokens: N x (h w) x C tokens, row-major.
            guidance: N x (h w) x G normalised appearance guidance.
            height, width: the map size h, w.

        Returns:
            N x (h w) x C tokens.
        """
        window, shift = effective_window(height, width, self.window_size, self.shift_size)
        pad_height, pad_width = (-height) % window, (-width) % window

        # Attention input: normed tokens with their guidance, padded, rolled, in windows.
        joined = torch.cat([self.norm1(tokens), guidance], dim=-1)
        joined = rearrange(joined, "n (h w) c -> n h w c", h=height, w=width)
        joined = F.pad(joined, (0, 0, 0, pad_width, 0, pad_height))
        if shift > 0:
            joined = torch.roll(joined, shifts=(-shift, -shift), dims=(1, 2))
        padded_height, padded_width = joined.shape[1:3]
        grid = {"nh": padded_height // window, "nw": padded_width // window}
        windows = rearrange(
            joined, "n (nh wh) (nw ww) c -> (n nh nw) (wh ww) c", wh=window, ww=window, **grid
        )
        mask = self._mask_for(height, width, window, shift, tokens.device)
        attended = self.attn(windows, grid["nh"] * grid["nw"], mask)

        # Back to maps: undo the windows, the roll and the padding.
        attended = rearrange(
            attended, "(n nh nw) (wh ww) c -> n (nh wh) (nw ww) c", wh=window, ww=window, **grid
        )
        if shift > 0:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        attended = rearrange(attended[:, :height, :width], "n h w c -> n (h w) c")

        tokens = tokens + attended
        return tokens + self.mlp(self.norm2(tokens))


class SpatialAggregation(nn.Module):
    """Spatial aggregation of every class's cost map: a plain and a shifted Swin block."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        guidance_dim: int,
        num_heads: int,
        window_size: int,
        feature_resolution: Tuple[int, int],
        class_chunk: int,
    ) -> None:
        super().__init__()
        block_args = dict(
            dim=hidden_dim,
            guidance_dim=guidance_dim,
            num_heads=num_heads,
            window_size=window_size,
            feature_resolution=feature_resolution,
        )
        self.block_1 = GuidedSwinBlock(shift_size=0, **block_args)
        self.block_2 = GuidedSwinBlock(shift_size=window_size // 2, **block_args)
        self.guidance_norm = nn.LayerNorm(guidance_dim)
        self.class_chunk = class_chunk

    def forward(self, embedding: torch.Tensor, appearance: torch.Tensor) -> torch.Tensor:
        """Aggregate B x C x T x h x w cost embeddings over space, guided by B x G x h x w.

        Classes are independent here, so they run in chunks of ``class_chunk`` to bound memory.
        """
        batch_size, _, num_classes, height, width = embedding.shape
        guidance = self.guidance_norm(rearrange(appearance, "b g h w -> b (h w) g"))
        chunk = self.class_chunk if self.class_chunk > 0 else num_classes
        outputs = []
        for part in embedding.split(chunk, dim=2):
            tokens = rearrange(part, "b c t h w -> (b t) (h w) c")
            part_guidance = repeat(guidance, "b l g -> (b t) l g", t=part.shape[2])
            tokens = self.block_1(tokens, part_guidance, height, width)
            tokens = self.block_2(tokens, part_guidance, height, width)
            outputs.append(
                rearrange(tokens, "(b t) (h w) c -> b c t h w", b=batch_size, h=height, w=width)
            )
        return torch.cat(outputs, dim=2)


class GuidedLinearAttention(nn.Module):
    """Multi-head linear attention ("Transformers are RNNs", Katharopoulos et al., ICML 2020).

    The feature map is elu(x) + 1. Queries and keys see the tokens concatenated with their
    guidance, values the tokens alone. There is no output projection.
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Attend over the S tokens of each of M sequences: M x S x C, guidance M x S x G."""
        joined = torch.cat([tokens, guidance], dim=-1)
        split = "m s (h d) -> m s h d"
        query = F.elu(rearrange(self.q(joined), split, h=self.num_heads)) + 1
        key = F.elu(rearrange(self.k(joined), split, h=self.num_heads)) + 1
        value = rearrange(self.v(tokens), split, h=self.num_heads)

        # As in the release, the values are divided by S before the sums and the result is
        # multiplied back, which keeps the sums small. The eps is added to the unscaled
        # denominator.
        length = value.shape[1]
        key_values = torch.einsum("mshd,mshe->mhde", key, value / length)
        denominator = torch.einsum("mshd,mhd->msh", query, key.sum(dim=1)) + LINEAR_ATTENTION_EPS
        attended = torch.einsum("mshd,mhde->mshe", query, key_values) / denominator[..., None]
        return rearrange(attended * length, "m s h e -> m s (h e)")


class ClassAggregation(nn.Module):
    """Class aggregation: a linear-attention transformer across the classes of every cell.

    It runs on the cost embedding average-pooled by ``pooling_size`` and adds the bilinearly
    upsampled result (align_corners=True), pooled input included, to its input. With
    ``pad_classes``, fewer than ``class_budget`` classes are padded to the budget with the
    learned ``padding_tokens`` and ``padding_guidance``, which take part in the attention.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        guidance_dim: int,
        num_heads: int,
        pooling_size: Tuple[int, int],
        class_budget: int,
        pad_classes: bool,
    ) -> None:
        super().__init__()
        self.class_budget = class_budget
        self.pad_classes = pad_classes
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))
        self.attention = GuidedLinearAttention(hidden_dim, guidance_dim, num_heads)
        self.MLP = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * MLP_RATIO),
            nn.ReLU(),
            nn.Linear(hidden_dim * MLP_RATIO, hidden_dim),
        )
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.pool = nn.AvgPool2d(tuple(pooling_size))

    def forward(self, embedding: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        """Aggregate B x C x T x h x w embeddings across classes, guided by B x T x G."""
        batch_size, _, num_classes, height, width = embedding.shape
        pooled = self.pool(rearrange(embedding, "b c t h w -> (b t) c h w"))
        pooled_height, pooled_width = pooled.shape[-2:]
        cells = {"b": batch_size, "h": pooled_height, "w": pooled_width}
        tokens = rearrange(pooled, "(b t) c h w -> (b h w) t c", **cells)

        # Learned padding up to the class budget. The padded entries are dropped afterwards.
        num_padding = 0
        if self.pad_classes and num_classes < self.class_budget:
            num_padding = self.class_budget - num_classes
        if num_padding > 0:
            padding = self.padding_tokens.expand(tokens.shape[0], num_padding, -1)
            tokens = torch.cat([tokens, padding], dim=1)
            guidance_padding = self.padding_guidance.expand(batch_size, num_padding, -1)
            text_guidance = torch.cat([text_guidance, guidance_padding], dim=1)
        guidance = repeat(text_guidance, "b s g -> (b h w) s g", **cells)

        tokens = tokens + self.attention(self.norm1(tokens), guidance)
        tokens = tokens + self.MLP(self.norm2(tokens))

        update = rearrange(tokens[:, :num_classes], "(b h w) t c -> (b t) c h w", **cells)
        update = F.interpolate(update, size=(height, width), mode="bilinear", align_corners=True)
        return embedding + rearrange(update, "(b t) c h w -> b c t h w", b=batch_size)


class AggregationLayer(nn.Module):
    """One aggregation layer: spatial aggregation, then class aggregation."""

    def __init__(self, swin_block: SpatialAggregation, attention: ClassAggregation) -> None:
        super().__init__()
        self.swin_block = swin_block
        self.attention = attention

    def forward(
        self, embedding: torch.Tensor, appearance: torch.Tensor, text_guidance: torch.Tensor
    ) -> torch.Tensor:
        """Map B x C x T x h x w to the same shape (appearance B x G x h x w, text B x T x G)."""
        return self.attention(self.swin_block(embedding, appearance), text_guidance)


class DoubleConv(nn.Module):
    """Two 3x3 convolutions (no bias), each followed by GroupNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # The release sizes both GroupNorms by the middle width, which equals out_channels.
        groups = out_channels // CHANNELS_PER_GROUP
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.double_conv(features)


class GuidedUpsampling(nn.Module):
    """A 2x transposed-conv upsampling that concatenates a guidance map, then a DoubleConv."""

    def __init__(self, in_channels: int, guidance_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(
            in_channels, in_channels - guidance_channels, kernel_size=2, stride=2
        )
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Map (B t) x C x h x w features to (B t) x C' x 2h x 2w with B x G x 2h x 2w guidance."""
        upsampled = self.up(features)
        classes = features.shape[0] // guidance.shape[0]
        guidance = repeat(guidance, "b g h w -> (b t) g h w", t=classes)
        return self.conv(torch.cat([upsampled, guidance], dim=1))


def _check_positive(values: Dict[str, object]) -> None:
    """Raise ValueError unless every value is a positive int. The keys name the arguments."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_int_pair(name: str, values: Sequence[int]) -> Tuple[int, int]:
    """Return ``values`` as a pair of positive ints, or raise ValueError naming ``name``."""
    values = tuple(values)
    if len(values) != 2:
        raise ValueError(f"{name} must contain two values, got {list(values)}")
    _check_positive({f"{name}[{index}]": value for index, value in enumerate(values)})
    return values


@DECODER_REGISTRY.register()
class CostAggregationDecoder(SegmentationDecoder):
    """Cost-aggregation decoder of "CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic
    Segmentation" (Cho et al., CVPR 2024), computed as the SkySense-O release computes it.

    1. Cost volume: cosine similarity of every image cell and every class's text embedding,
       one channel per prompt template, B x P x T x h x w.
    2. Class budget: with more than ``class_budget`` classes, each image keeps the
       ``class_budget`` classes of highest maximum similarity over its cells. The others are
       not decoded and get the logit -100.
    3. Embedding: a 7x7 conv maps each class's P x h x w cost to C channels. The appearance
       guidance (the image embedding) and both decoder guidance maps go through a 3x3 conv
       and ReLU. The text guidance is the normalised mean over prompts through a linear
       layer and ReLU.
    4. ``num_layers`` aggregation layers, each a pair of Swin blocks per class (the second
       one shifted) whose queries and keys, not values, see the normed appearance guidance,
       then linear attention across classes on the 2x2-pooled map, guided by the text.
    5. Two upsampling blocks (2x transposed conv, concatenated decoder guidance, two 3x3
       conv + GroupNorm + ReLU), then a 3x3 conv to one logit per class at 4x resolution.

    The release has these details, which the released weights depend on:

    * The top-k class budget with its -100 canvas, and the padding of fewer classes to the
      budget with learned ``padding_tokens`` and ``padding_guidance``. Linear attention has no
      mask, so the padding changes the logits of the real classes.
    * The class-aggregation residual adds the upsampled pooled input *and* its update,
      x + up(pool(x) + delta), and upsamples with align_corners=True.
    * The Swin blocks have no relative position bias and mask shifted windows with -100. The
      linear attention has no output projection.

    Beyond the release, any h x w map runs, and the shift mask is built for each size. Maps
    that are not a multiple of the window are padded, and padded tokens are masked out. A map
    whose shorter side is at most the window uses that side as window, unshifted, as the
    release's Swin block does. ``pad_classes=False`` runs class attention over the real
    classes only.
    """

    @configurable
    def __init__(
        self,
        *,
        text_guidance_in_dim: int,
        appearance_guidance_in_dim: int,
        text_guidance_dim: int,
        appearance_guidance_dim: int,
        decoder_guidance_in_dims: Sequence[int],
        decoder_guidance_dims: Sequence[int],
        upsample_dims: Sequence[int],
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        window_size: int,
        pooling_size: Sequence[int],
        feature_resolution: Sequence[int],
        prompt_channels: int,
        class_budget: int,
        pad_classes: bool,
        class_chunk: int,
    ) -> None:
        """
        Args:
            text_guidance_in_dim: width E of the text embeddings.
            appearance_guidance_in_dim: channels of the appearance guidance map (E).
            text_guidance_dim: width of the projected text guidance.
            appearance_guidance_dim: width of the projected appearance guidance.
            decoder_guidance_in_dims: channels (G0, G1) of the coarse and fine guidance maps.
            decoder_guidance_dims: their widths after projection, coarse then fine.
            upsample_dims: output channels of the two upsampling blocks, coarse then fine.
                Each is at least 16 and divisible by its GroupNorm group count (width // 16).
            hidden_dim: width C of the cost embedding, a multiple of ``num_heads``.
            num_layers: number of aggregation layers.
            num_heads: heads of the window attention and of the linear attention.
            window_size: window of the Swin blocks in cells. The second block shifts by half.
            pooling_size: (height, width) of the average pooling before class attention.
            feature_resolution: (h, w) that the persistent shift mask is built for. Release
                checkpoints store it for (24, 24).
            prompt_channels: P, the prompt channels of ``text_embeds``.
            class_budget: most classes decoded per image (the top ones by similarity).
            pad_classes: pad fewer classes to ``class_budget`` with learned tokens.
            class_chunk: number of classes that go through the spatial and upsampling stages
                together (these stages treat classes independently). 0 runs all at once.
        """
        super().__init__()
        key = "MODEL.SKYSENSE_O.DECODER."
        _check_positive(
            {
                "text_guidance_in_dim (backbone.embed_dim)": text_guidance_in_dim,
                "appearance_guidance_in_dim (backbone.embed_dim)": appearance_guidance_in_dim,
                f"text_guidance_dim ({key}TEXT_GUIDANCE_DIM)": text_guidance_dim,
                f"appearance_guidance_dim ({key}APPEARANCE_GUIDANCE_DIM)": appearance_guidance_dim,
                f"hidden_dim ({key}HIDDEN_DIM)": hidden_dim,
                f"num_layers ({key}NUM_LAYERS)": num_layers,
                f"num_heads ({key}NUM_HEADS)": num_heads,
                f"window_size ({key}WINDOW_SIZE)": window_size,
                f"class_budget ({key}CLASS_BUDGET)": class_budget,
                "prompt_channels (1, or len(MODEL.SKYSENSE_O.TEXT.TEMPLATES))": prompt_channels,
            }
        )
        if isinstance(class_chunk, bool) or not isinstance(class_chunk, int) or class_chunk < 0:
            raise ValueError(
                f"class_chunk ({key}CLASS_CHUNK) must be an integer >= 0, got {class_chunk!r}"
            )
        if hidden_dim % num_heads != 0:
            raise ValueError(
                f"hidden_dim ({key}HIDDEN_DIM) = {hidden_dim} must be divisible by num_heads "
                f"({key}NUM_HEADS) = {num_heads}"
            )
        guidance_in = _check_int_pair(
            f"decoder_guidance_in_dims ({key}GUIDANCE_CHANNELS)", decoder_guidance_in_dims
        )
        guidance_out = _check_int_pair(
            f"decoder_guidance_dims ({key}UPSAMPLE_GUIDANCE_DIMS)", decoder_guidance_dims
        )
        upsample = _check_int_pair(f"upsample_dims ({key}UPSAMPLE_DIMS)", upsample_dims)
        pooling = _check_int_pair(f"pooling_size ({key}POOLING_SIZE)", pooling_size)
        resolution = _check_int_pair("feature_resolution", feature_resolution)
        _check_upsampling_widths(hidden_dim, guidance_out, upsample)

        self.text_guidance_in_dim = text_guidance_in_dim
        self.appearance_guidance_in_dim = appearance_guidance_in_dim
        self.decoder_guidance_in_dims = guidance_in
        self.prompt_channels = prompt_channels
        self.class_budget = class_budget
        self.pooling_size = pooling
        self.class_chunk = class_chunk

        # Registration order follows the release, so state dicts list keys in the same order.
        self.layers = nn.ModuleList(
            AggregationLayer(
                SpatialAggregation(
                    hidden_dim=hidden_dim,
                    guidance_dim=appearance_guidance_dim,
                    num_heads=num_heads,
                    window_size=window_size,
                    feature_resolution=resolution,
                    class_chunk=class_chunk,
                ),
                ClassAggregation(
                    hidden_dim=hidden_dim,
                    guidance_dim=text_guidance_dim,
                    num_heads=num_heads,
                    pooling_size=pooling,
                    class_budget=class_budget,
                    pad_classes=pad_classes,
                ),
            )
            for _ in range(num_layers)
        )
        self.conv1 = nn.Conv2d(prompt_channels, hidden_dim, kernel_size=7, padding=3)
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(appearance_guidance_in_dim, appearance_guidance_dim, 3, padding=1),
            nn.ReLU(),
        )
        self.text_guidance_projection = nn.Sequential(
            nn.Linear(text_guidance_in_dim, text_guidance_dim), nn.ReLU()
        )
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU())
            for channels_in, channels_out in zip(guidance_in, guidance_out)
        )
        self.decoder1 = GuidedUpsampling(hidden_dim, guidance_out[0], upsample[0])
        self.decoder2 = GuidedUpsampling(upsample[0], guidance_out[1], upsample[1])
        self.head = nn.Conv2d(upsample[1], 1, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, cfg, backbone) -> Dict[str, object]:
        for attribute in ("embed_dim", "dense_stride"):
            if not hasattr(backbone, attribute):
                raise TypeError(
                    f"CostAggregationDecoder needs a backbone with an {attribute} attribute, "
                    f"got a {type(backbone).__name__}"
                )
        node = cfg.MODEL.SKYSENSE_O
        decoder_cfg = node.DECODER
        image_size = node.BACKBONE.IMAGE_SIZE
        if backbone.dense_stride < 1 or image_size < backbone.dense_stride:
            raise ValueError(
                f"MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE = {image_size} must be at least the "
                f"backbone's dense_stride ({backbone.dense_stride}), which must be positive"
            )
        feature_side = image_size // backbone.dense_stride
        return {
            "text_guidance_in_dim": backbone.embed_dim,
            "appearance_guidance_in_dim": backbone.embed_dim,
            "text_guidance_dim": decoder_cfg.TEXT_GUIDANCE_DIM,
            "appearance_guidance_dim": decoder_cfg.APPEARANCE_GUIDANCE_DIM,
            "decoder_guidance_in_dims": list(decoder_cfg.GUIDANCE_CHANNELS),
            "decoder_guidance_dims": list(decoder_cfg.UPSAMPLE_GUIDANCE_DIMS),
            "upsample_dims": list(decoder_cfg.UPSAMPLE_DIMS),
            "hidden_dim": decoder_cfg.HIDDEN_DIM,
            "num_layers": decoder_cfg.NUM_LAYERS,
            "num_heads": decoder_cfg.NUM_HEADS,
            "window_size": decoder_cfg.WINDOW_SIZE,
            "pooling_size": list(decoder_cfg.POOLING_SIZE),
            "feature_resolution": [feature_side, feature_side],
            "prompt_channels": prompt_channels_from_config(node.TEXT),
            "class_budget": decoder_cfg.CLASS_BUDGET,
            "pad_classes": decoder_cfg.PAD_CLASSES,
            "class_chunk": decoder_cfg.CLASS_CHUNK,
        }

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> torch.Tensor:
        """Predict one logit map per class.

        Args:
            image_embeds: B x E x h x w dense image embedding (not normalised).
            text_embeds: B x T x P x E class-text embeddings (normalised here again).
            guidance: [appearance B x E x h x w, coarse B x G0 x 2h x 2w,
                fine B x G1 x 4h x 4w].

        Returns:
            B x T x 4h x 4w logits. Classes outside an image's budget get -100.
        """
        self._check_inputs(image_embeds, text_embeds, guidance)
        num_classes = text_embeds.shape[1]
        text_embeds = F.normalize(text_embeds, dim=-1)
        cost = self.cost_volume(image_embeds, text_embeds)

        # Over budget: keep each image's top classes and recompute their cost.
        selected = self.select_classes(cost)
        if selected is not None:
            log_first_n(
                logging.INFO,
                f"{num_classes} classes exceed the decoder's class budget of "
                f"{self.class_budget}: each image decodes its top {self.class_budget} classes "
                f"by cost, the others get logit {DROPPED_CLASS_LOGIT}",
                n=1,
                name=__name__,
            )
            index = selected[:, :, None, None].expand(-1, -1, *text_embeds.shape[2:])
            text_embeds = torch.gather(text_embeds, 1, index)
            cost = self.cost_volume(image_embeds, text_embeds)

        logits = self._aggregate(cost, text_embeds, guidance)
        if selected is None:
            return logits
        return scatter_selected_classes(logits, selected, num_classes)

    def cost_volume(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Return the B x P x T x h x w cosine similarity of B x E x h x w and B x T x P x E."""
        image_embeds = F.normalize(image_embeds, dim=1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        return torch.einsum("bchw,btpc->bpthw", image_embeds, text_embeds)

    def select_classes(self, cost: torch.Tensor) -> Optional[torch.Tensor]:
        """Return the B x class_budget indices of each image's classes of highest maximum
        cost over prompts and cells (in no particular order), or None within the budget."""
        if cost.shape[2] <= self.class_budget:
            return None
        scores = cost.amax(dim=(1, 3, 4))
        return scores.topk(self.class_budget, dim=1, sorted=False).indices

    def _aggregate(
        self, cost: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> torch.Tensor:
        """Map the B x P x T x h x w cost to B x T x 4h x 4w logits."""
        batch_size = cost.shape[0]
        embedding = self.conv1(rearrange(cost, "b p t h w -> (b t) p h w"))
        embedding = rearrange(embedding, "(b t) c h w -> b c t h w", b=batch_size)

        # Guidance: projected appearance, decoder and text features.
        appearance = self.guidance_projection(guidance[0])
        decoder_guidance = [
            projection(features)
            for projection, features in zip(self.decoder_guidance_projection, guidance[1:])
        ]
        text_guidance = F.normalize(text_embeds.mean(dim=2), dim=-1)
        text_guidance = self.text_guidance_projection(text_guidance)

        for layer in self.layers:
            embedding = layer(embedding, appearance, text_guidance)
        return self._upsample(embedding, decoder_guidance)

    def _upsample(
        self, embedding: torch.Tensor, decoder_guidance: List[torch.Tensor]
    ) -> torch.Tensor:
        """Decode B x C x T x h x w to B x T x 4h x 4w logits, ``class_chunk`` classes at once."""
        batch_size, _, num_classes = embedding.shape[:3]
        chunk = self.class_chunk if self.class_chunk > 0 else num_classes
        logits = []
        for part in embedding.split(chunk, dim=2):
            features = rearrange(part, "b c t h w -> (b t) c h w")
            features = self.decoder1(features, decoder_guidance[0])
            features = self.decoder2(features, decoder_guidance[1])
            logits.append(rearrange(self.head(features), "(b t) 1 h w -> b t h w", b=batch_size))
        return torch.cat(logits, dim=1)

    def _check_inputs(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, guidance: List[torch.Tensor]
    ) -> None:
        """Raise ValueError on inputs that do not match the decoder contract."""
        if image_embeds.dim() != 4:
            raise ValueError(
                f"image_embeds must be B x E x h x w, got {tuple(image_embeds.shape)}"
            )
        batch_size, _, height, width = image_embeds.shape

        # Text: B x T x P x E with at least one class, in the image's embedding space.
        expected_text = (batch_size, self.prompt_channels, self.text_guidance_in_dim)
        text_shape = tuple(text_embeds.shape)
        if len(text_shape) != 4 or (text_shape[0], *text_shape[2:]) != expected_text:
            raise ValueError(
                f"text_embeds must be {batch_size} x T x {self.prompt_channels} x "
                f"{self.text_guidance_in_dim} (batch, classes, prompt channels, width), got "
                f"{text_shape}"
            )
        if text_shape[1] == 0:
            raise ValueError("text_embeds is empty (T = 0 classes); pass at least one class")
        if image_embeds.shape[1] != text_shape[3]:
            raise ValueError(
                f"image_embeds has {image_embeds.shape[1]} channels but text_embeds has width "
                f"{text_shape[3]}, and both must be in the same embedding space"
            )

        if height < self.pooling_size[0] or width < self.pooling_size[1]:
            raise ValueError(
                f"the feature map {height} x {width} is smaller than the class-attention "
                f"pooling size {self.pooling_size}, so use a larger input image"
            )

        # Guidance: one map at the embedding's size, one at 2x and one at 4x.
        if len(guidance) != 3:
            raise ValueError(
                f"guidance must be [appearance, coarse, fine], got {len(guidance)} maps"
            )
        names = ("appearance", "coarse", "fine")
        channels = (self.appearance_guidance_in_dim, *self.decoder_guidance_in_dims)
        for features, name, scale, channel in zip(guidance, names, (1, 2, 4), channels):
            expected = (batch_size, channel, scale * height, scale * width)
            if tuple(features.shape) != expected:
                raise ValueError(
                    f"{name} guidance must be {expected} for image_embeds "
                    f"{tuple(image_embeds.shape)}, got {tuple(features.shape)}"
                )


def prompt_channels_from_config(text_cfg) -> int:
    """Return P, the prompt channels that ``MODEL.SKYSENSE_O.TEXT`` gives the decoder."""
    if text_cfg.ENSEMBLE == "mean":
        return 1
    if text_cfg.ENSEMBLE == "channels":
        return len(text_cfg.TEMPLATES)
    raise ValueError(
        f"MODEL.SKYSENSE_O.TEXT.ENSEMBLE = {text_cfg.ENSEMBLE!r} is invalid, expected "
        "'mean' or 'channels'"
    )


def _check_upsampling_widths(
    hidden_dim: int, guidance_dims: Tuple[int, int], upsample_dims: Tuple[int, int]
) -> None:
    """Raise ValueError unless the upsampling blocks can be built with these widths."""
    for in_channels, guidance_dim, name in zip(
        (hidden_dim, upsample_dims[0]), guidance_dims, ("HIDDEN_DIM", "UPSAMPLE_DIMS[0]")
    ):
        if guidance_dim >= in_channels:
            raise ValueError(
                f"MODEL.SKYSENSE_O.DECODER.UPSAMPLE_GUIDANCE_DIMS entry {guidance_dim} must be "
                f"smaller than {name} = {in_channels}, because the upsampling convolution "
                "outputs that many channels minus the guidance channels"
            )
    for width in upsample_dims:
        groups = width // CHANNELS_PER_GROUP
        if groups < 1 or width % groups != 0:
            raise ValueError(
                f"MODEL.SKYSENSE_O.DECODER.UPSAMPLE_DIMS entry {width} is invalid: GroupNorm "
                f"uses width // {CHANNELS_PER_GROUP} groups, so the width must be at least "
                f"{CHANNELS_PER_GROUP} and divisible by that count (for example 16, 32, 48 or 64)"
            )
