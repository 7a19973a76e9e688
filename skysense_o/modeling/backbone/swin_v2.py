"""Swin Transformer V2 image tower of SkySense-CLIP, weight-compatible with the SkySense-O release.

Implements the design of "Swin Transformer V2: Scaling Up Capacity and Resolution" (Liu et al.,
CVPR 2022): residual post-norm blocks, scaled cosine window attention and a log-spaced continuous
position bias. Module and parameter names follow the MMClassification 0.25 implementation that
the release was trained with, so its state dict loads without renaming. On top of that design,
the release changes three things that the weights depend on:

* patch merging concatenates each 2x2 neighbourhood channel-major (what ``nn.Unfold`` produces),
  not pixel by pixel as the official Swin code does;
* the last stage keeps the resolution of the third: every channel is repeated four times, as if
  the four pixels of a 2x2 patch were equal, and then goes through an ordinary merge layer;
* window attention does not mask the zero padding added to reach a multiple of the window size.
"""

import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

#: Variants of the image tower. The names and numbers are MMClassification 0.25's table for
#: SwinTransformerV2; "huge" is the release's image tower. MMClassification itself notes that
#: the head counts of "huge" are not certain to match the paper's, but they match the release.
SWIN_V2_ARCHS: Dict[str, Dict[str, object]] = {
    "tiny": {"embed_dims": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24],
             "extra_norm_every_n_blocks": 0},
    "small": {"embed_dims": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24],
              "extra_norm_every_n_blocks": 0},
    "base": {"embed_dims": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
             "extra_norm_every_n_blocks": 0},
    "large": {"embed_dims": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48],
              "extra_norm_every_n_blocks": 0},
    "huge": {"embed_dims": 352, "depths": [2, 2, 18, 2], "num_heads": [8, 16, 32, 64],
             "extra_norm_every_n_blocks": 6},
    "giant": {"embed_dims": 512, "depths": [2, 2, 42, 4], "num_heads": [16, 32, 64, 128],
              "extra_norm_every_n_blocks": 6},
}
ARCH_KEYS = ("embed_dims", "depths", "num_heads", "extra_norm_every_n_blocks")

#: Deterministic attention buffers. They are persistent, so checkpoints contain them, but copies
#: in a checkpoint are dropped on load and the computed values kept, as the release does.
RECOMPUTED_BUFFERS = ("relative_coords_table", "relative_position_index")

# Hidden width of the continuous-position-bias MLP, fixed in Swin-V2.
CPB_HIDDEN = 512
# Upper bound of the log attention scale (logit_scale is clamped at ln(1 / 0.01) = ln 100).
MAX_LOGIT_SCALE = math.log(100.0)
# Additive attention mask between tokens of different regions of a shifted window.
SHIFT_MASK_VALUE = -100.0

ArchSpec = Union[str, Mapping[str, object]]


def resolve_swin_v2_arch(arch: ArchSpec) -> Dict[str, object]:
    """Return the architecture dict of a variant name or check an explicit dict.

    Args:
        arch: a key of ``SWIN_V2_ARCHS`` or a dict with exactly the keys ``ARCH_KEYS``.

    Raises:
        ValueError: unknown variant name, wrong keys, or per-stage lists of different lengths.
        TypeError: ``arch`` is neither a string nor a dict.
    """
    if isinstance(arch, str):
        if arch.lower() not in SWIN_V2_ARCHS:
            raise ValueError(
                f"unknown Swin-V2 variant {arch!r}; expected one of {', '.join(SWIN_V2_ARCHS)} "
                "or a dict with the keys " + ", ".join(ARCH_KEYS)
            )
        return dict(SWIN_V2_ARCHS[arch.lower()])
    if not isinstance(arch, Mapping):
        raise TypeError(f"arch must be a variant name or a dict, not {type(arch).__name__}")
    if set(arch) != set(ARCH_KEYS):
        raise ValueError(
            f"invalid custom Swin-V2 arch: it needs exactly the keys {', '.join(ARCH_KEYS)}, "
            f"but has {', '.join(sorted(arch))}"
        )
    resolved = {
        "embed_dims": int(arch["embed_dims"]),
        "depths": [int(d) for d in arch["depths"]],
        "num_heads": [int(h) for h in arch["num_heads"]],
        "extra_norm_every_n_blocks": int(arch["extra_norm_every_n_blocks"]),
    }
    if len(resolved["depths"]) != len(resolved["num_heads"]) or len(resolved["depths"]) < 2:
        raise ValueError(
            f"depths {resolved['depths']} and num_heads {resolved['num_heads']} must have the "
            "same length, with at least two stages"
        )
    return resolved


def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """Compute the log-spaced relative coordinates that feed the position-bias MLP.

    Entry [0, a, b] is the offset (dy, dx) = (a - (w - 1), b - (w - 1)), divided by
    ``pretrained_window_size - 1`` when that is positive and by ``w - 1`` otherwise, scaled
    by 8 and mapped through t -> sign(t) * log2(1 + |t|) / log2(8).

    Returns:
        1 x (2w - 1) x (2w - 1) x 2 float32 tensor, channel 0 vertical and channel 1 horizontal.
    """
    offsets = torch.arange(-(window_size - 1), window_size, dtype=torch.float32)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    table = torch.stack([dy, dx], dim=-1).unsqueeze(0)
    span = pretrained_window_size if pretrained_window_size > 0 else window_size
    # The division, scaling and log map run in this order in float32 so the table is bit-equal
    # to the one the weights were trained with.
    table = table / (span - 1)
    table = table * 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Compute the index into the coordinate table for every query/key pair of a window.

    For tokens i at (yi, xi) and j at (yj, xj), row-major in the window, the index is
    (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1).

    Returns:
        w² x w² int64 tensor.
    """
    rows, cols = torch.meshgrid(
        torch.arange(window_size), torch.arange(window_size), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    delta_y = rows[:, None] - rows[None, :] + window_size - 1
    delta_x = cols[:, None] - cols[None, :] + window_size - 1
    return delta_y * (2 * window_size - 1) + delta_x


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split B x H x W x C into (B·nW) x w² x C windows, windows and tokens in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size,
               channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_reverse(
    windows: torch.Tensor, height: int, width: int, window_size: int
) -> torch.Tensor:
    """Merge (B·nW) x w² x C windows back into B x H x W x C (inverse of window_partition)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size,
                     channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(
    padded_size: Tuple[int, int], window_size: int, shift_size: int, device: torch.device
) -> torch.Tensor:
    """Build the additive mask that keeps cyclically shifted windows from mixing regions.

    Rows of the padded map fall in the ranges [0, Hp - w), [Hp - w, Hp - s) and [Hp - s, Hp),
    columns likewise, which gives nine regions. Two tokens of one window in different regions
    get ``SHIFT_MASK_VALUE``, others 0.

    Returns:
        nW x w² x w² float32 mask for the padded size (Hp, Wp).
    """
    def band(length: int) -> torch.Tensor:
        position = torch.arange(length, device=device)
        return (position >= length - window_size).long() + (position >= length - shift_size).long()

    height, width = padded_size
    regions = band(height)[:, None] * 3 + band(width)[None, :]
    regions = window_partition(regions.view(1, height, width, 1), window_size).squeeze(-1)
    different = regions[:, :, None] != regions[:, None, :]
    return different.float() * SHIFT_MASK_VALUE


class WindowMSAV2(nn.Module):
    """Scaled cosine multi-head attention inside one window, with a continuous position bias.

    Attention logits are cos(q, k) · exp(min(logit_scale, ln 100)) plus 16·sigmoid of a bias
    that a 2-layer MLP computes from log-spaced relative coordinates. Keys get no bias, because
    the qkv bias is [q_bias, 0, v_bias].
    """

    def __init__(
        self, embed_dims: int, num_heads: int, window_size: int, pretrained_window_size: int = 0
    ):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size

        # Registration order reproduces the release's state-dict order.
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.q_bias = nn.Parameter(torch.zeros(embed_dims))
        self.v_bias = nn.Parameter(torch.zeros(embed_dims))
        self.register_buffer(
            "relative_coords_table", relative_coords_table(window_size, pretrained_window_size)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(CPB_HIDDEN, num_heads, bias=False),
        )
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=False)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def position_bias(self) -> torch.Tensor:
        """Return the heads x w² x w² continuous position bias, 16·sigmoid(MLP(table)[index])."""
        tokens = self.window_size * self.window_size
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: (B·nW) x N x C tokens of N = w² per window.
            mask: optional nW x N x N additive mask, the same for every image of the batch.

        Returns:
            (B·nW) x N x C.
        """
        num_windows, tokens, channels = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        # (B·nW) x N x 3C -> 3 x (B·nW) x heads x N x head_dim
        qkv = qkv.reshape(num_windows, tokens, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attn = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        attn = attn + self.position_bias().unsqueeze(0)
        if mask is not None:
            mask_windows = mask.shape[0]
            attn = attn.view(-1, mask_windows, self.num_heads, tokens, tokens)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, tokens, tokens)
        attn = attn.softmax(dim=-1)

        out = (attn @ value).transpose(1, 2).reshape(num_windows, tokens, channels)
        return self.proj(out)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Stored copies of the deterministic tables are ignored and the computed ones kept, so
        # that a checkpoint saved with another window configuration cannot corrupt them. A
        # model built on the meta device gets real tables here, on the device of the weights.
        weights = state_dict.get(prefix + "q_bias")
        for name in RECOMPUTED_BUFFERS:
            state_dict.pop(prefix + name, None)
        if self.relative_coords_table.is_meta:
            device = weights.device if weights is not None and not weights.is_meta else "cpu"
            self.reset_buffers(torch.device(device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in RECOMPUTED_BUFFERS:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the coordinate table and position index on ``device``."""
        self.relative_coords_table = relative_coords_table(
            self.window_size, self.pretrained_window_size
        ).to(device)
        self.relative_position_index = relative_position_index(self.window_size).to(device)


class ShiftWindowMSA(nn.Module):
    """(Shifted) window attention over a token map: pad, roll, partition, attend, undo.

    The zero padding that brings the map to a multiple of the window is not masked, as in the
    release. In unshifted windows, real tokens attend to padded ones, whose keys are zero and
    whose values equal ``v_bias``.
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int,
                 pretrained_window_size: int = 0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must lie in [0, window_size {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSAV2(embed_dims, num_heads, window_size, pretrained_window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Apply window attention to B x (H·W) x C tokens of an H x W map, keeping the shape."""
        batch, _, channels = x.shape
        height, width = hw_shape
        window, shift = self.window_size, self.shift_size
        assert min(height, width) >= window, "SwinTransformerV2.forward checks the map size"
        if min(height, width) == window:
            # A window that covers the whole map has nothing to shift into.
            shift = 0

        # Zero-pad bottom and right to whole windows, then shift cyclically.
        x = x.view(batch, height, width, channels)
        pad_bottom = (window - height % window) % window
        pad_right = (window - width % window) % window
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_size = (x.shape[1], x.shape[2])
        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_size, window, shift, x.device)

        # Attend per window, then undo the partition, the shift and the padding.
        windows = self.w_msa(window_partition(x, window), mask=mask)
        x = window_reverse(windows, padded_size[0], padded_size[1], window)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :height, :width, :].contiguous().view(batch, height * width, channels)
        return self.drop_path(x)


class FeedForward(nn.Module):
    """Two-layer MLP with exact GELU, named ``layers.0.0`` and ``layers.1`` as in the release."""

    def __init__(self, embed_dims: int, hidden_dims: int, drop_path: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.GELU()),
            nn.Linear(hidden_dims, embed_dims),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map B x L x C to B x L x C."""
        return self.drop_path(self.layers(x))


class SwinBlockV2(nn.Module):
    """Residual post-norm block: x + LN1(attn(x)), then y + LN2(FFN(y)), then optionally LN3."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, *, shift: bool,
                 extra_norm: bool, pretrained_window_size: int = 0, drop_path: float = 0.0,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size,
                                   window_size // 2 if shift else 0, pretrained_window_size,
                                   drop_path)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.ffn = FeedForward(embed_dims, 4 * embed_dims, drop_path)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.norm3 = nn.LayerNorm(embed_dims) if extra_norm else None

    def _forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        x = x + self.norm1(self.attn(x, hw_shape))
        x = x + self.norm2(self.ffn(x))
        if self.norm3 is not None:
            x = self.norm3(x)
        return x

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """Map B x (H·W) x C tokens to the same shape."""
        if self.with_cp and x.requires_grad:
            return checkpoint(self._forward, x, hw_shape, use_reentrant=False)
        return self._forward(x, hw_shape)


class PatchMerging(nn.Module):
    """Post-norm patch merging: 2x2 neighbourhoods to 4C channels, Linear to 2C, LayerNorm.

    The 4C vector is channel-major: entry c·4 + dy·2 + dx is channel c of the pixel at
    offset (dy, dx), which is the order ``F.unfold`` produces. With ``keep_resolution`` (the
    release's last stage) every channel is instead repeated four times in place, so the map
    keeps its size and the same layer shapes apply.
    """

    def __init__(self, in_channels: int, out_channels: int, keep_resolution: bool = False):
        super().__init__()
        self.keep_resolution = keep_resolution
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def forward(
        self, x: torch.Tensor, hw_shape: Tuple[int, int]
    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Merge B x (H·W) x C tokens into B x L' x C' tokens and return them with (H', W')."""
        if self.keep_resolution:
            merged = x.repeat_interleave(4, dim=-1)
            out_shape = hw_shape
        else:
            batch, _, channels = x.shape
            height, width = hw_shape
            grid = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
            # Odd sizes get one row or column of zeros at the bottom or right.
            grid = F.pad(grid, (0, width % 2, 0, height % 2))
            merged = F.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)
            out_shape = ((height + 1) // 2, (width + 1) // 2)
        return self.norm(self.reduction(merged)), out_shape


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(kernel = stride = patch), then LayerNorm."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Embed B x C x H x W images into B x (H'·W') x D tokens and return them with (H', W')."""
        height, width = images.shape[-2:]
        patch = self.patch_size
        # Sizes that are not a multiple of the patch are zero-padded at the bottom and right.
        pad_right, pad_bottom = (patch - width % patch) % patch, (patch - height % patch) % patch
        images = F.pad(images, (0, pad_right, 0, pad_bottom))
        x = self.projection(images)
        out_shape = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), out_shape


class SwinStageV2(nn.Module):
    """One stage: an optional patch merging layer, then blocks that alternate unshifted/shifted."""

    def __init__(self, embed_dims: int, depth: int, num_heads: int, window_size: int, *,
                 downsample: Optional[PatchMerging], extra_norm_every_n_blocks: int,
                 pretrained_window_size: int, drop_paths: Sequence[float], with_cp: bool):
        super().__init__()
        self.downsample = downsample
        every = extra_norm_every_n_blocks
        self.blocks = nn.ModuleList(
            SwinBlockV2(embed_dims, num_heads, window_size, shift=index % 2 == 1,
                        extra_norm=every > 0 and (index + 1) % every == 0,
                        pretrained_window_size=pretrained_window_size,
                        drop_path=drop_paths[index], with_cp=with_cp)
            for index in range(depth)
        )

    def forward(
        self, x: torch.Tensor, hw_shape: Tuple[int, int]
    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Run the stage on B x L x C tokens and return the output tokens with their (H, W)."""
        if self.downsample is not None:
            x, hw_shape = self.downsample(x, hw_shape)
        for block in self.blocks:
            x = block(x, hw_shape)
        return x, hw_shape


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 ("Swin Transformer V2: Scaling Up Capacity and Resolution", Liu et al.,
    CVPR 2022) as the SkySense-CLIP image tower.

    Stage i > 0 starts with a patch merging layer that doubles the channels. It halves the
    resolution, except in the last stage, which keeps the resolution of the one before. Every
    stage output goes through LayerNorm ``norm{i}``. For the "huge" variant and a 384 x 384 input
    the outputs are 352@96², 704@48², 1408@24² and 2816@24² (strides 4, 8, 16, 16).
    """

    def __init__(
        self,
        *,
        arch: ArchSpec = "huge",
        window_sizes: Sequence[int] = (8, 8, 8, 16),
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 8),
        patch_size: int = 4,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        with_cp: bool = False,
    ):
        """
        Args:
            arch: a name in ``SWIN_V2_ARCHS`` or a dict with the keys ``ARCH_KEYS``.
            window_sizes: attention window per stage, in tokens per side.
            pretrained_window_sizes: window each stage was pre-trained with, which scales the
                position-bias coordinates. 0 means the stage's own window.
            patch_size: side of the patch-embedding kernel and stride, in pixels.
            in_channels: image channels.
            drop_path_rate: stochastic-depth probability of the last block, rising linearly
                from 0 at the first block (training only).
            with_cp: recompute each block in the backward pass (gradient checkpointing).
        """
        super().__init__()
        settings = resolve_swin_v2_arch(arch)
        depths, num_heads = settings["depths"], settings["num_heads"]
        num_stages = len(depths)
        for name, values in (("window_sizes", window_sizes),
                             ("pretrained_window_sizes", pretrained_window_sizes)):
            if len(values) != num_stages:
                raise ValueError(f"{name} {list(values)} needs one entry per stage ({num_stages})")
        self.window_sizes = [int(w) for w in window_sizes]
        self.patch_size = patch_size
        embed_dims = settings["embed_dims"]
        self.channels = [embed_dims * 2 ** i for i in range(num_stages)]
        self.strides = [patch_size * 2 ** min(i, num_stages - 2) for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size)
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            downsample = None
            if i > 0:
                downsample = PatchMerging(self.channels[i - 1], self.channels[i],
                                          keep_resolution=i == num_stages - 1)
            start = sum(depths[:i])
            self.stages.append(SwinStageV2(
                self.channels[i], depths[i], num_heads[i], self.window_sizes[i],
                downsample=downsample,
                extra_norm_every_n_blocks=settings["extra_norm_every_n_blocks"],
                pretrained_window_size=int(pretrained_window_sizes[i]),
                drop_paths=rates[start:start + depths[i]], with_cp=with_cp,
            ))
        for i, channels in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise randomly: truncated normal (std 0.02) linear weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def feature_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Return the (h, w) token-map size of every stage for an H x W input."""
        size = (math.ceil(height / self.patch_size), math.ceil(width / self.patch_size))
        sizes = [size]
        for i in range(1, len(self.channels)):
            if i < len(self.channels) - 1:
                size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
            sizes.append(size)
        return sizes

    def min_input_size(self) -> int:
        """Return the smallest image side (pixels) whose every stage map covers its window."""
        return max(stride * (window - 1) + 1
                   for stride, window in zip(self.strides, self.window_sizes))

    def recomputed_buffer_keys(self, prefix: str = "") -> List[str]:
        """Return the state-dict keys of the deterministic buffers that loading recomputes."""
        return [prefix + name for name, _ in self.named_buffers()
                if name.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS]

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Encode images into one normalised feature map per stage.

        Args:
            images: B x C x H x W normalised images; H and W at least ``min_input_size()``.

        Returns:
            Stage maps, B x channels[i] x h_i x w_i, after ``norm{i}``.
        """
        in_channels = self.patch_embed.projection.in_channels
        if images.dim() != 4 or images.shape[1] != in_channels:
            raise ValueError(
                f"expected B x {in_channels} x H x W images, got shape {tuple(images.shape)}"
            )
        sizes = self.feature_sizes(images.shape[-2], images.shape[-1])
        for stage, ((height, width), window) in enumerate(zip(sizes, self.window_sizes)):
            if min(height, width) < window:
                raise ValueError(
                    f"a {images.shape[-2]}x{images.shape[-1]} image gives a {height}x{width} map "
                    f"in stage {stage}, smaller than its {window}-token attention window; use "
                    f"images of at least {self.min_input_size()} pixels per side"
                )

        x, hw_shape = self.patch_embed(images)
        outputs = []
        for i, stage in enumerate(self.stages):
            x, hw_shape = stage(x, hw_shape)
            out = getattr(self, f"norm{i}")(x)
            out = out.view(-1, *hw_shape, self.channels[i]).permute(0, 3, 1, 2)
            outputs.append(out.contiguous())
        return outputs
