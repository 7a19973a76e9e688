"""Any open_clip model with a ViT image tower, used as a dense vision-language backbone.

The image tower is a Vision Transformer as in CLIP (Radford et al., "Learning Transferable
Visual Models From Natural Language Supervision", ICML 2021). For segmentation, every patch
token goes through the tower's final LayerNorm and projection, which gives a dense map in the
joint embedding space. The tokens of two intermediate layers serve as guidance maps, as in
CAT-Seg (Cho et al., "CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic Segmentation",
CVPR 2024).
"""

import logging
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Set, Tuple

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from open_clip.transformer import Attention, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...utils.weights import extract_state_dict, load_state_dict_checked, load_weights_file
from .base import (
    VL_BACKBONE_REGISTRY,
    DenseFeatures,
    VisionLanguageBackbone,
    check_finetune_mode,
)

logger = logging.getLogger(__name__)

#: Folder of this project's open_clip architecture files (for example SkySense-Tiny.json).
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs"

# Architecture names with these prefixes name their own weight source in open_clip.
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
# Wrapper prefixes that training frameworks put in front of every key of a CLIP state dict.
_WRAPPER_PREFIXES = ("module.", "model.", "clip.")
# Parameters outside both towers: the contrastive temperature and bias, unused here.
_CONTRASTIVE_PARAMETERS = ("logit_scale", "logit_bias")
# Parameter names (last component) that the "attention" fine-tuning mode trains besides the
# attention projections.
_POSITION_PARAMETERS = ("positional_embedding", "class_embedding", "cls_emb")


def register_model_configs() -> None:
    """Add this project's architectures (``MODEL_CONFIG_DIR``) to open_clip's model list.

    Calling it again does nothing, because the folder is added only while one of its
    architectures is still unknown to open_clip.
    """
    names = {path.stem for path in MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def canonical_arch_name(arch: str) -> str:
    """Return the name open_clip registers ``arch`` under ("ViT-B/16" becomes "ViT-B-16")."""
    return arch if arch.startswith(_SCHEMA_PREFIXES) else arch.replace("/", "-")


def _attention_pool_error(arch: str) -> ValueError:
    return ValueError(
        f"open_clip architecture {arch!r} pools with attention, so its patch tokens have no "
        "projection to the embedding space. Choose a ViT with class-token or average pooling."
    )


def _check_vision_config(arch: str, model_cfg: Mapping) -> None:
    """Raise ValueError unless the architecture's config describes a ViT image tower."""
    vision_cfg = model_cfg.get("vision_cfg", {})
    if vision_cfg.get("timm_model_name") or not isinstance(vision_cfg.get("layers", 12), int):
        raise ValueError(
            f"open_clip architecture {arch!r} has a timm or ResNet image tower, but "
            "OpenCLIPBackbone needs a ViT tower (for example ViT-B-16 or SkySense-Tiny)"
        )
    if vision_cfg.get("attentional_pool"):
        raise _attention_pool_error(arch)


def _check_vision_tower(arch: str, visual: nn.Module) -> None:
    """Raise ValueError unless ``visual`` is a ViT whose patch tokens can be projected."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"open_clip architecture {arch!r} has a {type(visual).__name__} image tower, but "
            "OpenCLIPBackbone needs open_clip's VisionTransformer"
        )
    if visual.attn_pool is not None:
        raise _attention_pool_error(arch)
    if visual.pool_type not in ("tok", "avg") or visual.proj is None:
        raise ValueError(
            f"open_clip architecture {arch!r} has no pooled projection (pool_type="
            f"{visual.pool_type!r}), but OpenCLIPBackbone needs pool_type 'tok' or 'avg'"
        )
    if any(size % patch for size, patch in zip(visual.image_size, visual.patch_size)):
        raise ValueError(
            f"image size {visual.image_size} of {arch!r} is not a multiple of its patch size "
            f"{visual.patch_size}. Set MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE to a multiple."
        )
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError(
            f"the image tower of {arch!r} runs sequence-first, but OpenCLIPBackbone needs "
            "batch-first blocks. Install a newer open-clip-torch (tested with 3.3.0)."
        )


def _strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items()}


def _prepare_state_dict(
    model: nn.Module, state_dict: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Convert the common layouts of CLIP checkpoints to the keys of ``model``.

    Args:
        model: the open_clip ``CLIP`` or ``CustomTextCLIP`` model to load into.
        state_dict: tensors of an open_clip, RemoteCLIP or GeoRSCLIP checkpoint.

    Returns:
        The converted state dict. The shapes are not checked here.
    """
    # Remove wrapper prefixes (DistributedDataParallel, Lightning modules, this backbone's own
    # "model." attribute), including nested ones such as "module.model.".
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = _strip_prefix(state_dict, prefix)
                stripped = True

    # open_clip's CLIP keeps the text tower at the top level and CustomTextCLIP under "text.",
    # so a checkpoint saved from one class is moved to the layout of the other.
    if hasattr(model, "text"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    elif any(key.startswith("text.") for key in state_dict):
        state_dict = {
            (key[len("text.") :] if key.startswith("text.") else key): value
            for key, value in state_dict.items()
        }

    # Older checkpoints store the temperature as a scalar and newer ones as a 1-element vector.
    for name in _CONTRASTIVE_PARAMETERS:
        target = getattr(model, name, None)
        value = state_dict.get(name)
        if isinstance(target, torch.Tensor) and value is not None:
            if value.numel() == target.numel():
                state_dict[name] = value.reshape(target.shape)

    # A checkpoint trained at another image size has another grid of position embeddings, so
    # open_clip resizes it bicubically and logs the two grid sizes.
    resize_pos_embed(state_dict, model)
    return state_dict


def load_open_clip_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local CLIP checkpoint strictly into an open_clip model.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` model.
        path: an open_clip checkpoint (a dict with "state_dict", keys maybe prefixed "module.")
            or a plain state dict as released by RemoteCLIP and GeoRSCLIP (keys maybe prefixed
            "model."), saved with ``torch.save`` or as safetensors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointMismatchError: keys are missing or unexpected or a shape differs. The message
            names the keys.
    """
    state_dict = extract_state_dict(load_weights_file(path))
    state_dict = _prepare_state_dict(model, dict(state_dict))
    load_state_dict_checked(model, state_dict, strict=True, source=str(path))
    logger.info("OpenCLIPBackbone: loaded weights from %s", path)


def build_open_clip_model(
    *, arch: str, pretrained: str = "", checkpoint: str = "", image_size: int,
    full_weights_follow: bool = False,
) -> nn.Module:
    """Create an open_clip model with a ViT image tower and load its weights.

    Args:
        arch: open_clip architecture name, or an "hf-hub:"/"local-dir:" identifier.
        pretrained: open_clip pretrained tag, whose weights open_clip downloads.
        checkpoint: local weight file, see ``load_open_clip_checkpoint``.
        image_size: side of the square input (pixels) that sets the grid of position
            embeddings. Weights trained at another size are resized to it.
        full_weights_follow: full-model weights (MODEL.WEIGHTS) will replace these, so random
            towers are logged at INFO instead of WARNING.

    Returns:
        The open_clip model on the CPU, in float32.
    """
    if pretrained and checkpoint:
        raise ValueError(
            f"both a pretrained tag ({pretrained!r}) and a local checkpoint ({checkpoint!r}) are "
            "set. Set only one of MODEL.SKYSENSE_O.BACKBONE.PRETRAINED and CHECKPOINT."
        )
    register_model_configs()
    arch = canonical_arch_name(arch)
    has_schema = arch.startswith(_SCHEMA_PREFIXES)
    if has_schema and pretrained:
        raise ValueError(
            f"{arch!r} brings its own weights, so the pretrained tag {pretrained!r} would be "
            "ignored. Leave MODEL.SKYSENSE_O.BACKBONE.PRETRAINED empty."
        )
    if not has_schema:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(
                f"unknown open_clip architecture {arch!r}. open_clip.list_models() returns the "
                "known names."
            )
        _check_vision_config(arch, model_cfg)
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained and pretrained not in tags:
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for {arch!r}. Known tags: "
                f"{', '.join(tags) or 'none'}. For a local file set CHECKPOINT instead."
            )

    # Only a pretrained tag or a schema without a local checkpoint makes open_clip load weights.
    load_weights = bool(pretrained) or (has_schema and not checkpoint)
    model = open_clip.create_model(
        arch,
        pretrained=pretrained or None,
        load_weights=load_weights,
        force_image_size=image_size,
        pretrained_text=False,
    )
    _check_vision_tower(arch, model.visual)
    if checkpoint:
        load_open_clip_checkpoint(model, checkpoint)
    elif not load_weights:
        # With full-model weights on the way, random towers are expected, not a warning sign.
        level = logging.INFO if full_weights_follow else logging.WARNING
        logger.log(
            level,
            "OpenCLIPBackbone %s is built with random weights: neither "
            "MODEL.SKYSENSE_O.BACKBONE.PRETRAINED nor CHECKPOINT is set. Full-model weights "
            "(MODEL.WEIGHTS, --weights) loaded next replace them; without those the model "
            "is only useful for training from scratch or for tests.",
            arch,
        )
    return model


def _check_guidance_layers(guidance_layers: Sequence[int], depth: int) -> Tuple[int, int]:
    """Return the two guidance layer indices, or raise ValueError for invalid ones."""
    layers = tuple(guidance_layers)
    if len(layers) != 2 or not all(isinstance(index, int) for index in layers):
        raise ValueError(
            f"MODEL.SKYSENSE_O.BACKBONE.GUIDANCE_LAYERS={list(layers)} must be two integer "
            "layer indices"
        )
    for index in layers:
        if not 0 <= index < depth:
            raise ValueError(
                f"MODEL.SKYSENSE_O.BACKBONE.GUIDANCE_LAYERS={list(layers)} contains layer "
                f"{index}, but the image tower has {depth} layers (valid indices 0..{depth - 1})"
            )
    return layers[0], layers[1]


@VL_BACKBONE_REGISTRY.register()
class OpenCLIPBackbone(VisionLanguageBackbone):
    """An open_clip model with a ViT image tower, giving dense embeddings and guidance maps.

    The image tower is run layer by layer so that any input whose sides are multiples of the
    patch size works: the position embeddings are interpolated bicubically to the token grid.
    """

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        tokenizer: Callable[[List[str]], torch.Tensor],
        guidance_layers: Sequence[int],
        visual_finetune: str = "full",
        text_finetune: str = "full",
        grad_checkpointing: bool = False,
        arch: str = "open_clip model",
    ):
        """
        Args:
            model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT image tower.
            tokenizer: open_clip tokenizer of that model (a list of N texts to N x L ids).
            guidance_layers: indices (0-based) of the two layers whose tokens are the guidance
                maps, in the order of ``DenseFeatures.guidance``.
            visual_finetune, text_finetune: "frozen", "attention" or "full", see
                ``set_finetune``.
            grad_checkpointing: recompute each image-tower block in the backward pass of
                training, which saves activation memory.
            arch: architecture name, for messages.
        """
        super().__init__()
        _check_vision_tower(arch, model.visual)
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        visual = model.visual
        self.guidance_layers = _check_guidance_layers(
            guidance_layers, len(visual.transformer.resblocks)
        )
        self.grad_checkpointing = grad_checkpointing

        patch_height, patch_width = visual.patch_size
        if patch_height != patch_width:
            raise ValueError(f"{arch!r} has non-square patches {visual.patch_size}")
        self.embed_dim = int(visual.proj.shape[1])
        self.dense_stride = int(patch_height)
        self.guidance_channels = (visual.transformer.width, visual.transformer.width)
        self.guidance_strides = (self.dense_stride, self.dense_stride)
        # open_clip stores the normalisation for 0..1 images, but this project's are 0..255.
        image_mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        image_std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.pixel_mean = tuple(255.0 * float(value) for value in image_mean)
        self.pixel_std = tuple(255.0 * float(value) for value in image_std)

        self.set_finetune(visual_finetune, text_finetune)

    @classmethod
    def from_config(cls, cfg) -> dict:
        node = cfg.MODEL.SKYSENSE_O.BACKBONE
        arch = canonical_arch_name(node.ARCH)
        model = build_open_clip_model(
            arch=arch,
            pretrained=node.PRETRAINED,
            checkpoint=node.CHECKPOINT,
            full_weights_follow=bool(cfg.MODEL.WEIGHTS),
            image_size=node.IMAGE_SIZE,
        )
        return {
            "model": model,
            "tokenizer": open_clip.get_tokenizer(arch),
            "guidance_layers": list(node.GUIDANCE_LAYERS),
            "visual_finetune": node.VISUAL_FINETUNE,
            "text_finetune": node.TEXT_FINETUNE,
            "grad_checkpointing": node.GRAD_CHECKPOINTING,
            "arch": arch,
        }

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    # ---- Image tower ------------------------------------------------------------------------

    def _positional_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Return the (1 + h*w) x width position embeddings for an h x w token grid."""
        visual = self.model.visual
        embedding = visual.positional_embedding
        native_height, native_width = visual.grid_size
        if (grid_height, grid_width) == (native_height, native_width):
            return embedding

        # The class token keeps its embedding, and the patch embeddings form a grid that is
        # resampled bicubically.
        class_embedding, patch_embedding = embedding[:1], embedding[1:]
        patch_embedding = patch_embedding.reshape(1, native_height, native_width, -1)
        patch_embedding = F.interpolate(
            patch_embedding.permute(0, 3, 1, 2).float(),
            size=(grid_height, grid_width),
            mode="bicubic",
            align_corners=False,
        )
        patch_embedding = patch_embedding.permute(0, 2, 3, 1).reshape(grid_height * grid_width, -1)
        return torch.cat([class_embedding, patch_embedding.to(embedding.dtype)], dim=0)

    def _run_image_tower(
        self, images: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor], Tuple[int, int]]:
        """Run the ViT on B x 3 x H x W images.

        Returns:
            (tokens, layer_tokens, (h, w)): the B x (1 + h*w) x width tokens after the last
            block, the tokens after each guidance layer (same shape), and the token grid.
        """
        visual = self.model.visual
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.dense_stride or width % self.dense_stride:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size "
                f"{self.dense_stride}. Pad or resize the images."
            )

        # Patch embedding: B x width x h x w, flattened to B x h*w x width.
        patches = visual.conv1(images.to(visual.conv1.weight.dtype))
        grid = (patches.shape[2], patches.shape[3])
        tokens = patches.flatten(2).transpose(1, 2)

        # Class token first, then the position embeddings and the pre-norm. Patch dropout is
        # skipped on purpose, because a dense map needs every patch token.
        class_token = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([class_token, tokens], dim=1)
        tokens = tokens + self._positional_embedding(*grid).to(tokens.dtype)
        tokens = visual.ln_pre(tokens)

        use_checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        layer_tokens = {}
        for index, block in enumerate(visual.transformer.resblocks):
            if use_checkpointing:
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index in self.guidance_layers:
                layer_tokens[index] = tokens
        return tokens, layer_tokens, grid

    def encode_dense(self, images: torch.Tensor) -> DenseFeatures:
        """Return the dense embedding and the two guidance maps of normalised images.

        Args:
            images: B x 3 x H x W, normalised with ``pixel_mean`` and ``pixel_std``. H and W
                must be multiples of ``dense_stride`` (the patch size).

        Returns:
            ``DenseFeatures`` with embedding B x E x h x w (h = H / patch, w = W / patch) and
            guidance [B x width x h x w] * 2, in the order of the guidance layers.
        """
        visual = self.model.visual
        tokens, layer_tokens, (grid_height, grid_width) = self._run_image_tower(images)

        def to_map(patch_tokens: torch.Tensor) -> torch.Tensor:
            # B x h*w x C -> B x C x h x w
            return patch_tokens.transpose(1, 2).reshape(
                patch_tokens.shape[0], -1, grid_height, grid_width
            )

        # Every patch token goes through the final LayerNorm and projection, the path that the
        # pooled token takes. Towers with final_ln_after_pool normalise the pooled vector
        # instead, and normalising each token is the per-position equivalent of that.
        embedding = to_map(visual.ln_post(tokens[:, 1:]) @ visual.proj)
        guidance = [to_map(layer_tokens[index][:, 1:]) for index in self.guidance_layers]
        return DenseFeatures(embedding=embedding, guidance=guidance)

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Return the B x E pooled image embeddings (not normalised) of normalised images.

        At the model's native image size this equals open_clip's ``encode_image``. Other sizes
        (multiples of the patch size) use interpolated position embeddings.
        """
        visual = self.model.visual
        tokens, _, _ = self._run_image_tower(images)

        def pool(values: torch.Tensor) -> torch.Tensor:
            return values[:, 0] if visual.pool_type == "tok" else values[:, 1:].mean(dim=1)

        if visual.final_ln_after_pool:
            pooled = visual.ln_post(pool(tokens))
        else:
            pooled = pool(visual.ln_post(tokens))
        return pooled @ visual.proj

    # ---- Text tower -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the N x L int64 token ids of ``texts`` on the backbone's device."""
        if isinstance(texts, str):
            raise TypeError(f"tokenize expects a sequence of texts, got the string {texts!r}")
        return self.tokenizer(list(texts)).to(self.device)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Return the N x E text embeddings (not normalised) of N x L token ids."""
        return self.model.encode_text(token_ids)

    def text_parameters(self) -> List[nn.Parameter]:
        """Return the parameters of the text tower (everything outside ``visual.``)."""
        return [parameter for _, parameter in self._tower_parameters("text")]

    # ---- Fine-tuning ------------------------------------------------------------------------

    def _tower_parameters(self, tower: str) -> List[Tuple[str, nn.Parameter]]:
        """Return (name, parameter) pairs of the "visual" or the "text" tower."""
        pairs = []
        for name, parameter in self.model.named_parameters():
            if name in _CONTRASTIVE_PARAMETERS:
                continue
            if name.startswith("visual.") == (tower == "visual"):
                pairs.append((name, parameter))
        return pairs

    def _attention_parameter_names(self) -> Set[str]:
        """Return the names of the attention-projection parameters of both towers."""
        names = set()
        for module_name, module in self.model.named_modules():
            if isinstance(module, (nn.MultiheadAttention, Attention)):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
        return names

    def set_finetune(self, visual_mode: str, text_mode: str) -> None:
        """Set which parameters of each tower are trained.

        Args:
            visual_mode, text_mode: "frozen" (no parameter is trained), "attention" (the
                attention projections of every block plus the position and class embeddings)
                or "full" (every parameter of the tower). The contrastive temperature is
                always frozen because no loss here uses it.
        """
        check_finetune_mode(visual_mode, "visual")
        check_finetune_mode(text_mode, "text")
        attention_names = self._attention_parameter_names()

        # Decide for every parameter first, so that an invalid mode changes nothing.
        trainable = {}
        for tower, mode in (("visual", visual_mode), ("text", text_mode)):
            named_parameters = self._tower_parameters(tower)
            if mode == "attention" and not any(
                name in attention_names for name, _ in named_parameters
            ):
                raise ValueError(
                    f"the {tower} tower of {self.arch!r} has no open_clip attention blocks, so "
                    "fine-tune mode 'attention' is not available. Use 'frozen' or 'full'."
                )
            for name, _ in named_parameters:
                is_attention = (
                    name in attention_names or name.rsplit(".", 1)[-1] in _POSITION_PARAMETERS
                )
                trainable[name] = mode == "full" or (mode == "attention" and is_attention)

        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(trainable.get(name, False))
        self.visual_finetune = visual_mode
        self.text_finetune = text_mode
