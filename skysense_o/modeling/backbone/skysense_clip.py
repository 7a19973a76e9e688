"""SkySense-CLIP: the vision-language backbone of the SkySense-O release.

The image tower is a Swin Transformer V2 (see ``swin_v2.py``). The text tower is a CLIP text
transformer (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", 2021) built from open_clip's blocks, with a causal mask, exact GELU and pooling at
the end-of-text token. Parameter names equal the release's, so this module's state dict is the
release checkpoint's ``sem_seg_head.clip_model.*`` entries with that prefix removed.
"""

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from open_clip.transformer import LayerNorm, Transformer, text_global_pool
from torch import nn

from ...utils.weights import extract_state_dict, load_state_dict_checked, load_weights_file
from .base import VL_BACKBONE_REGISTRY, DenseFeatures, VisionLanguageBackbone, check_finetune_mode
from .swin_v2 import ArchSpec, SwinTransformerV2

logger = logging.getLogger(__name__)

#: Per-channel normalisation the release's weights were trained with (ImageNet statistics),
#: RGB in 0..255 units.
RELEASE_PIXEL_MEAN = (123.675, 116.28, 103.53)
RELEASE_PIXEL_STD = (58.395, 57.12, 57.375)

#: In the SkySense-CLIP pre-training file, the image tower's keys carry this prefix inside
#: ``checkpoint["model"]``, which also holds SkySense's other branches.
PRETRAIN_VISUAL_PREFIX = "backbone_gep."

# Parameter-name fragments trained in the "attention" fine-tune mode, per tower.
_VISUAL_ATTENTION_PARAMS = (".w_msa.qkv.", ".w_msa.q_bias", ".w_msa.v_bias", ".w_msa.cpb_mlp.",
                            ".w_msa.logit_scale")
_TEXT_ATTENTION_PARAMS = (".attn.in_proj_", "positional_embedding")

PathLike = Union[str, Path]


def causal_attention_mask(length: int) -> torch.Tensor:
    """Return the additive L x L causal mask: -inf above the diagonal, 0 elsewhere."""
    return torch.full((length, length), float("-inf")).triu(1)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """Tokenise texts with CLIP's byte-pair encoding (open_clip's tokenizer).

    Each row is <start_of_text>, the BPE ids and <end_of_text>, zero-padded to
    ``context_length``. Longer texts are cut and end with <end_of_text>.

    Returns:
        N x context_length int64 ids on the CPU.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [text for text in texts if not isinstance(text, str)]
    if bad:
        raise TypeError(f"texts must be strings; got {type(bad[0]).__name__} value {bad[0]!r}")
    return open_clip.tokenizer.tokenize(texts, context_length=context_length)


def is_skysense_clip_pretrain(checkpoint: Any) -> bool:
    """Return whether ``checkpoint`` has the pre-training layout ('clip' and 'model' parts)."""
    if not isinstance(checkpoint, Mapping):
        return False
    if isinstance(checkpoint.get("clip"), Mapping):
        return True
    model = checkpoint.get("model")
    return isinstance(model, Mapping) and any(
        isinstance(key, str) and key.startswith(PRETRAIN_VISUAL_PREFIX) for key in model
    )


def convert_skysense_clip_pretrain(
    checkpoint: Mapping[str, Any]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Convert the SkySense-CLIP pre-training file to a ``SkySenseCLIP`` state dict.

    The file holds 'clip' (SkySenseCLIP keys, no prefix) and 'model' (the multi-branch SkySense
    weights). Only the ``backbone_gep.*`` entries of 'model' are used: they are renamed to
    ``visual.*`` and override 'clip' entries of the same name. Everything else is ignored and
    logged once.

    Returns:
        (state_dict, ignored_keys), ignored keys named "model.<key>", "clip.<key>" for
        non-tensor entries, or the top-level key.

    Raises:
        ValueError: ``checkpoint`` is not a dict, or its 'clip' or 'model' part is not a dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"expected a dict with 'clip' and 'model', got {type(checkpoint).__name__}"
        )
    parts = {}
    for part in ("clip", "model"):
        value = checkpoint.get(part, {})
        if not isinstance(value, Mapping):
            raise ValueError(f"checkpoint[{part!r}] must be a dict, got {type(value).__name__}")
        parts[part] = value

    state: Dict[str, torch.Tensor] = {}
    ignored = [str(key) for key in checkpoint if key not in parts]
    for key, value in parts["clip"].items():
        if isinstance(value, torch.Tensor):
            state[key] = value
        else:
            ignored.append(f"clip.{key}")
    for key, value in parts["model"].items():
        if isinstance(key, str) and key.startswith(PRETRAIN_VISUAL_PREFIX) and isinstance(
            value, torch.Tensor
        ):
            state["visual." + key[len(PRETRAIN_VISUAL_PREFIX):]] = value
        else:
            ignored.append(f"model.{key}")

    if ignored:
        preview = ", ".join(ignored[:5])
        if len(ignored) > 5:
            preview += f", ... ({len(ignored) - 5} more)"
        logger.info(
            "SkySense-CLIP pre-training file: ignored %d entries outside the CLIP weights and "
            "the %s* image tower: %s", len(ignored), PRETRAIN_VISUAL_PREFIX, preview,
        )
    return state, ignored


class SkySenseCLIP(nn.Module):
    """The SkySense-CLIP model: Swin-V2 image tower, CLIP text tower and their projections.

    ``encode_image`` and ``encode_text`` follow the release's methods, with two deliberate
    differences: dense maps of any aspect ratio are reshaped correctly (the release assumes
    square maps), and pooled embeddings keep the batch axis (the release drops it for B = 1).
    """

    def __init__(self, *, visual: SwinTransformerV2, embed_dim: int, text_width: int,
                 text_layers: int, text_heads: int, context_length: int = 77,
                 vocab_size: int = 49408):
        """
        Args:
            visual: the image tower.
            embed_dim: width E of the joint embedding space.
            text_width, text_layers, text_heads: size of the text transformer.
            context_length: tokens per text, including start and end tokens.
            vocab_size: rows of the token embedding (49408 for CLIP's BPE).
        """
        super().__init__()
        if text_width % text_heads:
            raise ValueError(f"text_width {text_width} is not divisible by text_heads {text_heads}")
        self.context_length = context_length

        # Registration order reproduces the release's state-dict order.
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.vision_projection = nn.Parameter(torch.empty(visual.channels[-1], embed_dim))
        # The CLIP temperature; SkySense-O never uses it, but checkpoints contain it.
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.visual = visual
        self.transformer = Transformer(text_width, text_layers, text_heads, mlp_ratio=4.0,
                                       act_layer=nn.GELU, batch_first=True)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.ln_final = LayerNorm(text_width)
        self.register_buffer("attn_mask", causal_attention_mask(context_length), persistent=False)
        self.init_text_parameters()

    def init_text_parameters(self) -> None:
        """Initialise the text tower and both projections randomly, as CLIP does."""
        width = self.transformer.width
        proj_std = width ** -0.5 * (2 * self.transformer.layers) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        nn.init.normal_(self.vision_projection, std=self.vision_projection.shape[0] ** -0.5)

    def recomputed_buffer_keys(self) -> List[str]:
        """Return the state-dict keys that loading recomputes instead of reading."""
        return self.visual.recomputed_buffer_keys(prefix="visual.")

    def project_dense(self, stage_map: torch.Tensor) -> torch.Tensor:
        """Project the last stage map B x C x h x w to the B x E x h x w joint space."""
        batch, _, height, width = stage_map.shape
        tokens = stage_map.flatten(2).transpose(1, 2) @ self.vision_projection
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)

    def project_pooled(self, stage_map: torch.Tensor) -> torch.Tensor:
        """Average the last stage map B x C x h x w over space and project it to B x E."""
        return stage_map.mean(dim=(2, 3)) @ self.vision_projection

    def encode_image(
        self, images: torch.Tensor, dense: bool = False, normalize: bool = False
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Encode B x 3 x H x W normalised images.

        Args:
            dense: return the stage maps, the last one projected to E channels; otherwise
                the pooled, projected B x E embedding.
            normalize: L2-normalise the embedding (over channels in dense mode).

        Returns:
            dense: [B x C0 x h0 x w0, ..., B x E x h x w]; otherwise B x E.
        """
        stages = self.visual(images)
        if dense:
            embedding = self.project_dense(stages[-1])
            # NOTE: the release normalises a dense map over its width axis; SkySense-O never
            # requests that, and here the channel axis is normalised instead.
            return [*stages[:-1], F.normalize(embedding, dim=1) if normalize else embedding]
        pooled = self.project_pooled(stages[-1])
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode N x L token ids (L = context_length) into N x E text embeddings."""
        if token_ids.dim() != 2 or token_ids.shape[1] != self.context_length:
            raise ValueError(
                f"expected N x {self.context_length} token ids, got shape {tuple(token_ids.shape)}"
            )
        x = self.token_embedding(token_ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        # The end-of-text id is the largest id, so argmax finds its position.
        x = text_global_pool(x, token_ids, pool_type="argmax") @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A model built on the meta device gets a real causal mask when weights arrive.
        if self.attn_mask.is_meta:
            weights = state_dict.get(prefix + "positional_embedding")
            device = weights.device if weights is not None and not weights.is_meta else "cpu"
            self.attn_mask = causal_attention_mask(self.context_length).to(device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def load_skysense_clip_checkpoint(model: SkySenseCLIP, path: PathLike) -> None:
    """Load a SkySense-CLIP pre-training file or a plain SkySenseCLIP state dict strictly.

    Copies of the recomputed attention tables are dropped and may be absent; any other missing,
    unexpected or mis-shaped key raises ``CheckpointMismatchError``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a weight file, holds pickled code, or has no tensors.
    """
    checkpoint = load_weights_file(path, mmap=True)
    try:
        if is_skysense_clip_pretrain(checkpoint):
            state, _ = convert_skysense_clip_pretrain(checkpoint)
        else:
            state = extract_state_dict(checkpoint)
    except ValueError as error:
        raise ValueError(f"{path} is not a SkySense-CLIP weight file: {error}") from error

    recomputed = model.recomputed_buffer_keys()
    skipped = set(recomputed)
    state = {key: value for key, value in state.items() if key not in skipped}
    load_state_dict_checked(model, state, strict=True, source=str(path), ignore_missing=recomputed)


def _tower_of(name: str) -> Optional[str]:
    """Return "visual", "text" or None (the unused CLIP temperature) for a parameter name."""
    if name.startswith("visual.") or name == "vision_projection":
        return "visual"
    if name == "logit_scale":
        return None
    return "text"


@VL_BACKBONE_REGISTRY.register()
class SkySenseCLIPBackbone(SkySenseCLIP, VisionLanguageBackbone):
    """SkySense-CLIP as a ``VisionLanguageBackbone``.

    The module is the CLIP model itself, so its state dict has exactly the release's CLIP keys.
    The dense embedding is the projected last stage (stride 16); the guidance maps are the
    second and first stage outputs (strides 8 and 4).
    """

    pixel_mean = RELEASE_PIXEL_MEAN
    pixel_std = RELEASE_PIXEL_STD

    @configurable
    def __init__(
        self,
        *,
        arch: ArchSpec = "huge",
        window_sizes: Sequence[int] = (8, 8, 8, 16),
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 8),
        embed_dim: int = 1024,
        text_width: int = 1024,
        text_layers: int = 24,
        text_heads: int = 16,
        context_length: int = 77,
        vocab_size: int = 49408,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        checkpoint: str = "",
        visual_finetune: str = "full",
        text_finetune: str = "full",
    ):
        """
        Args:
            arch: Swin-V2 variant name ("tiny" ... "giant", "huge" in the release) or a dict
                with embed_dims, depths, num_heads and extra_norm_every_n_blocks.
            window_sizes, pretrained_window_sizes: per-stage attention windows and the
                windows the position bias was pre-trained with (0 means the stage's own).
            embed_dim, text_width, text_layers, text_heads, context_length, vocab_size: see
                ``SkySenseCLIP``.
            drop_path_rate: stochastic depth of the last image block (training only).
            grad_checkpointing: recompute blocks of both towers in the backward pass.
            checkpoint: weights to load, the pre-training file or a SkySenseCLIP state dict.
                Empty keeps the random initialisation.
            visual_finetune, text_finetune: "frozen", "attention" or "full".
        """
        check_finetune_mode(visual_finetune, "visual")
        check_finetune_mode(text_finetune, "text")
        visual = SwinTransformerV2(arch=arch, window_sizes=window_sizes,
                                   pretrained_window_sizes=pretrained_window_sizes,
                                   drop_path_rate=drop_path_rate, with_cp=grad_checkpointing)
        super().__init__(visual=visual, embed_dim=embed_dim, text_width=text_width,
                         text_layers=text_layers, text_heads=text_heads,
                         context_length=context_length, vocab_size=vocab_size)
        self.transformer.grad_checkpointing = grad_checkpointing
        self.embed_dim = embed_dim
        self.dense_stride = visual.strides[-1]
        self.guidance_channels = (visual.channels[1], visual.channels[0])
        self.guidance_strides = (visual.strides[1], visual.strides[0])

        if checkpoint:
            load_skysense_clip_checkpoint(self, checkpoint)
        else:
            logger.warning(
                "SkySenseCLIPBackbone: no checkpoint given, so both towers keep their random "
                "initialisation unless full-model weights are loaded afterwards"
            )
        self.set_finetune(visual_finetune, text_finetune)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        node = cfg.MODEL.SKYSENSE_O.BACKBONE
        clip = node.SKYSENSE_CLIP
        arch: ArchSpec = node.ARCH
        if arch == "custom":
            arch = {
                "embed_dims": clip.EMBED_DIMS,
                "depths": list(clip.DEPTHS),
                "num_heads": list(clip.NUM_HEADS),
                "extra_norm_every_n_blocks": clip.EXTRA_NORM_EVERY_N_BLOCKS,
            }
        return {
            "arch": arch,
            "window_sizes": tuple(clip.WINDOW_SIZES),
            "pretrained_window_sizes": tuple(clip.PRETRAINED_WINDOW_SIZES),
            "embed_dim": clip.EMBED_DIM,
            "text_width": clip.TEXT_WIDTH,
            "text_layers": clip.TEXT_LAYERS,
            "text_heads": clip.TEXT_HEADS,
            "context_length": clip.CONTEXT_LENGTH,
            "vocab_size": clip.VOCAB_SIZE,
            "drop_path_rate": clip.DROP_PATH_RATE,
            "grad_checkpointing": node.GRAD_CHECKPOINTING,
            "checkpoint": node.CHECKPOINT,
            "visual_finetune": node.VISUAL_FINETUNE,
            "text_finetune": node.TEXT_FINETUNE,
        }

    def encode_dense(self, images: torch.Tensor) -> DenseFeatures:
        """Return the B x E x h x w embedding (stride 16) and the stage-1 and stage-0 maps."""
        stages = self.visual(images)
        return DenseFeatures(embedding=self.project_dense(stages[-1]),
                             guidance=[stages[1], stages[0]])

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Return B x E embeddings: the mean last-stage token, projected (not normalised)."""
        return self.encode_image(images, dense=False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the N x context_length int64 CLIP ids of ``texts`` on the model's device."""
        return tokenize(texts, self.context_length).to(self.positional_embedding.device)

    def text_parameters(self) -> List[nn.Parameter]:
        """Return the text tower's parameters (token and position embeddings to projection)."""
        return [param for name, param in self.named_parameters() if _tower_of(name) == "text"]

    def set_finetune(self, visual_mode: str, text_mode: str) -> None:
        """Set ``requires_grad`` per tower: "frozen", "attention" or "full".

        "attention" trains the image tower's qkv weights, q/v biases, position-bias MLPs and
        attention temperatures, and the text tower's in_proj weights and biases and its
        positional embedding. The unused CLIP ``logit_scale`` is always frozen.
        NOTE: the release's "attention" mode also trains ``visual.norm0`` and ``visual.norm1``,
        and its "full" mode leaves token_embedding, ln_final and both projections frozen. Here,
        "full" trains every parameter of the tower.
        """
        check_finetune_mode(visual_mode, "visual")
        check_finetune_mode(text_mode, "text")
        modes = {"visual": visual_mode, "text": text_mode}
        fragments = {"visual": _VISUAL_ATTENTION_PARAMS, "text": _TEXT_ATTENTION_PARAMS}
        for name, param in self.named_parameters():
            tower = _tower_of(name)
            mode = modes.get(tower, "frozen")
            trainable = mode == "full" or (
                mode == "attention" and any(fragment in name for fragment in fragments[tower])
            )
            param.requires_grad_(trainable)
