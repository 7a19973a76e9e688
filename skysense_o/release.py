"""Load the released SkySense-O checkpoints, and build models for inference with little memory.

The release's fine-tuned checkpoint is a Detectron2 file (``{"model": state_dict}``) of the
whole training model. Besides the backbone, the decoder and the guidance convolutions, which
this project's ``SkySenseO`` has under the same names, it stores modules that inference never
uses (``RELEASE_UNUSED_KEY_GROUPS``). ``convert_release_state_dict`` skips those, unless the
model being loaded has them too, and reports what it skipped in one log line. Every other key
must still match, so a wrong configuration fails loudly.

``SkySenseOCheckpointer`` calls the converter on every load, so
``python train_net.py --eval-only --config-file configs/skysense_o_release.yaml MODEL.WEIGHTS
<file>`` reads the release file as it is. ``build_model_for_inference`` adds a low-memory path
for the 1.3-billion-parameter model: the model is built on the meta device and the file is
memory-mapped, so peak RAM stays near one copy of the weights.
"""

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from accelerate import init_empty_weights
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .checkpoint import REGENERATED_BUFFER_SUFFIXES, SkySenseOCheckpointer
from .modeling.backbone.skysense_clip import PRETRAIN_VISUAL_PREFIX
from .utils.weights import (
    CheckpointMismatchError,
    PathLike,
    extract_state_dict,
    load_state_dict_checked,
    load_weights_file,
)

logger = logging.getLogger(__name__)

DDP_PREFIX = "module."


@dataclass(frozen=True)
class UnusedKeyGroup:
    """Checkpoint keys, selected by name prefix, that SkySense-O's inference never reads."""

    name: str
    prefixes: Tuple[str, ...]
    reason: str


RELEASE_UNUSED_KEY_GROUPS: Tuple[UnusedKeyGroup, ...] = (
    UnusedKeyGroup(
        name="pixel_shuffle",
        prefixes=("pixel_shuffle_conv0.", "pixel_shuffle_conv1.", "pixel_shuffle_conv_scale."),
        # A 1x1 conv to 1024 x 256 channels, a pixel shuffle and a 1x1 conv upsample the
        # embedding 16x for the region losses. Built only with LOSS.REGION_POOLING
        # "pixel_shuffle"; pixel_shuffle_conv_scale exists only when CONTRAST_SCALE > 1.
        reason="the training-only region upsampler of the region losses",
    ),
    UnusedKeyGroup(
        name="tokennizer_model",
        # Sentence-transformers 2.x with transformers < 4.31 names the BERT module
        # "0.auto_model." and saves embeddings.position_ids. Newer versions name it "0.model.".
        prefixes=("tokennizer_model.",),
        reason="the all-MiniLM-L6-v2 sentence-embedding model of the training regulariser",
    ),
)

# Naming schemes of the sentence-embedding model, reported so that a user can tell which
# sentence-transformers version wrote the file.
_TOKENIZER_SCHEMES = (("tokennizer_model.0.auto_model.", "0.auto_model.*"),
                      ("tokennizer_model.0.model.", "0.model.*"))


def strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Return ``state_dict`` without the "module." prefix that DistributedDataParallel adds
    (only when every key has it)."""
    if state_dict and all(key.startswith(DDP_PREFIX) for key in state_dict):
        return {key[len(DDP_PREFIX):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def unused_key_group(key: str) -> Optional[UnusedKeyGroup]:
    """Return the group of ``RELEASE_UNUSED_KEY_GROUPS`` that ``key`` belongs to, if any."""
    for group in RELEASE_UNUSED_KEY_GROUPS:
        if key.startswith(group.prefixes):
            return group
    return None


def split_unused_keys(
    state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """Separate the release-only entries that the model does not have.

    A key of an unused group that the model does have (for example the pixel-shuffle
    convolutions with LOSS.REGION_POOLING "pixel_shuffle") is kept and loaded like any other.

    Returns:
        (kept state dict, skipped keys by group name).
    """
    model_keys = set(model_keys)
    kept: Dict[str, torch.Tensor] = {}
    skipped: Dict[str, List[str]] = {}
    for key, value in state_dict.items():
        group = unused_key_group(key)
        if group is None or key in model_keys:
            kept[key] = value
        else:
            skipped.setdefault(group.name, []).append(key)
    return kept, skipped


def describe_skipped(skipped: Mapping[str, List[str]]) -> str:
    """Return one line that counts the skipped keys per group, with each group's reason."""
    reasons = {group.name: group.reason for group in RELEASE_UNUSED_KEY_GROUPS}
    parts = []
    for name, keys in skipped.items():
        text = f"{len(keys)} {name}.* keys"
        if name == "tokennizer_model":
            schemes = [label for prefix, label in _TOKENIZER_SCHEMES
                       if any(key.startswith(prefix) for key in keys)]
            if schemes:
                text += f" in the naming {' and '.join(schemes)}"
        parts.append(f"{text}, {reasons[name]}")
    return "; ".join(parts)


def drop_stored_buffers(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Remove stored copies of the deterministic buffers, so the model keeps the computed ones.

    The release saves the Swin-V2 position tables and the decoder's shift mask. They follow
    from the configuration, so the model's own values are kept. A stored value that differs
    from the computed one means that the file was made with another window configuration, and
    is reported at WARNING.
    """
    buffers = dict(model.named_buffers())
    kept: Dict[str, torch.Tensor] = {}
    differing = []
    for key, value in state_dict.items():
        if not key.endswith(REGENERATED_BUFFER_SUFFIXES):
            kept[key] = value
            continue
        computed = buffers.get(key)
        comparable = computed is not None and not computed.is_meta
        if comparable and (computed.shape != value.shape or not torch.equal(
                computed.cpu(), value.to(computed.dtype))):
            differing.append(key)
    if differing:
        logger.warning(
            "%d stored deterministic buffers differ from the values computed for this "
            "configuration (first: %s); the computed values are used. Check that the config's "
            "window sizes match the checkpoint's.", len(differing), differing[0],
        )
    return kept


def convert_release_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Prepare a release (or this project's) checkpoint for a strict load into ``model``.

    Skips the ``RELEASE_UNUSED_KEY_GROUPS`` entries that ``model`` lacks, reporting them in one
    INFO line, and drops stored copies of deterministic buffers. Other keys pass unchanged.

    Raises:
        ValueError: the state dict is the SkySense-CLIP pre-training file's image tower, which
            belongs in MODEL.SKYSENSE_O.BACKBONE.CHECKPOINT.
    """
    state_dict = strip_ddp_prefix(state_dict)
    model_keys = model.state_dict().keys()
    pretrain_keys = [key for key in state_dict if key.startswith(PRETRAIN_VISUAL_PREFIX)]
    if pretrain_keys and not any(key.startswith(PRETRAIN_VISUAL_PREFIX) for key in model_keys):
        raise ValueError(
            f"the weights contain {len(pretrain_keys)} '{PRETRAIN_VISUAL_PREFIX}*' keys, so this is "
            "the SkySense-CLIP pre-training file, not a SkySense-O model. Give it as "
            "MODEL.SKYSENSE_O.BACKBONE.CHECKPOINT (to train from it) and the fine-tuned "
            "checkpoint as MODEL.WEIGHTS."
        )
    kept, skipped = split_unused_keys(state_dict, model_keys)
    if skipped:
        logger.info("Skipped %d checkpoint keys that inference does not use: %s",
                    sum(len(keys) for keys in skipped.values()), describe_skipped(skipped))
    return drop_stored_buffers(kept, model)


def match_model_dtypes(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Cast floating-point entries to the dtype of the model's tensor of the same name.

    Loading with ``assign=True`` keeps the file's tensors, dtype included, so a float16 file
    would otherwise turn a float32 model into float16. Casting copies only those tensors.
    """
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    converted: Dict[str, torch.Tensor] = {}
    casts: Counter = Counter()
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is not None and value.is_floating_point() and value.dtype != target.dtype:
            casts[f"{value.dtype} -> {target.dtype}"] += 1
            value = value.to(target.dtype)
        converted[key] = value
    if casts:
        logger.info("Cast checkpoint tensors to the model's dtypes: %s", dict(casts))
    return converted


class _AssigningModule:
    """Adapter through which ``load_state_dict_checked`` assigns the given tensors to a module
    (``load_state_dict(assign=True)``) instead of copying them into the module's own tensors,
    which have no storage on the meta device."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict, assign=True)


def meta_tensor_names(model: nn.Module) -> List[str]:
    """Return the names of parameters and buffers of ``model`` that are still on the meta
    device, that is, that no weights were loaded into."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in tensors if tensor.is_meta]


def load_weights_assigned(model: nn.Module, path: PathLike, *, strict: bool = True) -> None:
    """Load a weight file into a model built on the meta device, without copying the weights.

    The file is memory-mapped with ``torch.load(mmap=True, weights_only=True)`` and converted
    with ``convert_release_state_dict``. Its tensors then become the model's tensors
    (``load_state_dict(assign=True)``), so RAM keeps one copy of the weights, paged in from the
    file as they are used. Safetensors files are read whole instead of mapped.

    Raises:
        FileNotFoundError, ValueError: see ``load_weights_file``.
        CheckpointMismatchError: a key is missing, unexpected or mis-shaped (with ``strict``),
            or a parameter got no value (always: it would stay without storage).
    """
    source = str(path)
    state_dict = extract_state_dict(load_weights_file(path, mmap=True))
    state_dict = convert_release_state_dict(state_dict, model)
    state_dict = match_model_dtypes(state_dict, model)
    regenerated = [key for key in model.state_dict() if key.endswith(REGENERATED_BUFFER_SUFFIXES)]
    load_state_dict_checked(_AssigningModule(model), state_dict, strict=strict, source=source,
                            ignore_missing=regenerated)
    empty = meta_tensor_names(model)
    if empty:
        shown = ", ".join(empty[:10]) + (f", ... ({len(empty) - 10} more)" if len(empty) > 10
                                         else "")
        raise CheckpointMismatchError(
            f"{source} left {len(empty)} tensors without a value: {shown}. A low-memory load "
            "needs every parameter in the file; set MODEL.SKYSENSE_O.LOW_MEMORY_LOAD False "
            "for a partial load, where missing parameters keep their initialisation."
        )


def build_meta_model(cfg: CfgNode) -> nn.Module:
    """Build the configured meta-architecture with parameters on the meta device.

    Buffers stay real, because several are computed at construction and not stored in
    checkpoints (the causal text mask, the pixel mean and std).
    """
    cfg = cfg.clone()
    cfg.defrost()
    backbone = cfg.MODEL.SKYSENSE_O.BACKBONE
    if backbone.CHECKPOINT or backbone.PRETRAINED:
        # The full-model weights replace the backbone's, and a copy into meta tensors is lost.
        logger.info("Not loading the backbone weights (BACKBONE.CHECKPOINT=%r, PRETRAINED=%r): "
                    "MODEL.WEIGHTS holds the whole model", backbone.CHECKPOINT,
                    backbone.PRETRAINED)
        backbone.CHECKPOINT = ""
        backbone.PRETRAINED = ""
    with init_empty_weights(include_buffers=False):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def build_model_for_inference(
    cfg: CfgNode,
    weights: PathLike,
    device: Union[str, torch.device, None] = None,
    low_memory: bool = True,
) -> nn.Module:
    """Build the model of ``cfg``, load ``weights`` and return it in eval mode.

    Args:
        cfg: a SkySense-O config (``add_skysense_o_config`` keys).
        weights: a full-model weight file, for example the released checkpoint. Empty: no
            file, so the model keeps its initialisation (or its backbone checkpoint).
        device: where the model runs; default ``cfg.MODEL.DEVICE``.
        low_memory: build on the meta device and memory-map the file (peak RAM about one copy
            of the weights). The load is then always strict. Otherwise, and for backbones
            that cannot be built on the meta device (open_clip's), the model is built with
            random weights and loaded through ``SkySenseOCheckpointer`` with
            MODEL.SKYSENSE_O.WEIGHTS_STRICT (about two copies).

    Returns:
        The model, in eval mode, on ``device``.
    """
    device = torch.device(device if device is not None else cfg.MODEL.DEVICE)
    strict = cfg.MODEL.SKYSENSE_O.WEIGHTS_STRICT
    meta_model = None
    if weights and low_memory:
        try:
            meta_model = build_meta_model(cfg)
        except NotImplementedError as error:
            # open_clip's create_model moves its model to a device, which a model on the meta
            # device cannot do, so open_clip backbones load by copy.
            logger.warning("The model cannot be built on the meta device (%s), so the weights "
                           "are copied instead of memory-mapped", error)

    if not weights:
        logger.warning("No MODEL.WEIGHTS given: the model keeps its initial weights")
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    elif meta_model is not None:
        model = meta_model
        load_weights_assigned(model, weights, strict=strict)
        logger.info("Loaded %s memory-mapped", weights)
    else:
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        SkySenseOCheckpointer(model, strict=strict).load(str(weights))
    return model.to(device).eval()
