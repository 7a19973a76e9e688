"""Loading the released SkySense-O checkpoint layout, the release configs and low-memory loading.

The released file is about 5 GB, so the loading tests use the real key layout with the tiny
configuration of the reference vectors (the same names, smaller shapes), plus fake entries for
the modules that inference skips.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from PIL import Image

from skysense_o import add_skysense_o_config
from skysense_o.checkpoint import SkySenseOCheckpointer
from skysense_o.release import (
    RELEASE_UNUSED_KEY_GROUPS,
    build_meta_model,
    build_model_for_inference,
    convert_release_state_dict,
    unused_key_group,
)
from skysense_o.utils.weights import CheckpointMismatchError

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE_CONFIG = REPO_ROOT / "configs" / "skysense_o_release.yaml"
SLIDING_CONFIG = REPO_ROOT / "configs" / "skysense_o_release_sliding.yaml"
TRAINING_CONFIG = REPO_ROOT / "configs" / "skysense_o.yaml"
EVAL_CONFIG_DIR = REPO_ROOT / "configs" / "eval"

# The release's parameter count without the pixel-shuffle convolutions and the MiniLM model.
INFERENCE_PARAMETERS = 1_015_185_842
PIXEL_SHUFFLE_PARAMETERS = 269_747_200

# The configuration of the reference vectors: the release's layout with tiny widths.
TINY_RELEASE_OVERRIDES = [
    "MODEL.DEVICE", "cpu",
    "MODEL.SKYSENSE_O.BACKBONE.ARCH", "custom",
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.EMBED_DIMS", 12,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.DEPTHS", [2, 2, 2, 2],
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.NUM_HEADS", [2, 4, 8, 16],
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.EXTRA_NORM_EVERY_N_BLOCKS", 2,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.EMBED_DIM", 32,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_WIDTH", 64,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_LAYERS", 2,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_HEADS", 4,
    "MODEL.SKYSENSE_O.DECODER.GUIDANCE_CHANNELS", [24, 12],
    "MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM", 32,
    "MODEL.SKYSENSE_O.DECODER.TEXT_GUIDANCE_DIM", 16,
    "MODEL.SKYSENSE_O.DECODER.APPEARANCE_GUIDANCE_DIM", 16,
    "MODEL.SKYSENSE_O.DECODER.UPSAMPLE_DIMS", [32, 16],
    "MODEL.SKYSENSE_O.DECODER.UPSAMPLE_GUIDANCE_DIMS", [8, 4],
]

# Real key names of the release's sentence-embedding model, in both naming schemes, with
# small stand-in shapes.
FAKE_TOKENIZER_ENTRIES = {
    "tokennizer_model.0.auto_model.embeddings.position_ids": torch.arange(8)[None],
    "tokennizer_model.0.auto_model.embeddings.word_embeddings.weight": torch.randn(10, 4),
    "tokennizer_model.0.auto_model.encoder.layer.0.attention.self.query.weight": torch.randn(4, 4),
    "tokennizer_model.0.auto_model.pooler.dense.bias": torch.randn(4),
    "tokennizer_model.0.model.embeddings.word_embeddings.weight": torch.randn(10, 4),
    "tokennizer_model.0.model.encoder.layer.5.output.LayerNorm.bias": torch.randn(4),
}
CLASS_NAMES = ["building", "road", "tree", "low vegetation", "car"]


def release_cfg(*overrides, tiny: bool = True, config=RELEASE_CONFIG):
    """Return the release config, with the tiny widths unless ``tiny`` is False."""
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list((TINY_RELEASE_OVERRIDES if tiny else ["MODEL.DEVICE", "cpu"])
                        + list(overrides))
    return cfg


def build_tiny_model(seed: int, *overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = META_ARCH_REGISTRY.get("SkySenseO")(release_cfg(*overrides))
    return model.eval()


def fake_release_file(model: torch.nn.Module, path: Path, extra_region: bool = True) -> Dict:
    """Save ``model`` as the release stores its model: Detectron2's {"model": state_dict},
    with the deterministic buffers and the training-only modules' entries."""
    state_dict = dict(model.state_dict())
    if extra_region:
        width = model.backbone.embed_dim
        state_dict["pixel_shuffle_conv0.weight"] = torch.randn(width * 256, width, 1, 1)
        state_dict["pixel_shuffle_conv0.bias"] = torch.randn(width * 256)
        state_dict["pixel_shuffle_conv1.weight"] = torch.randn(width, width, 1, 1)
        state_dict["pixel_shuffle_conv1.bias"] = torch.randn(width)
    state_dict.update(FAKE_TOKENIZER_ENTRIES)
    torch.save({"model": state_dict, "iteration": 79999}, path)
    return state_dict


def segment(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        return model([{"image": image, "height": 75, "width": 100, "texts": CLASS_NAMES}])[0][
            "sem_seg"]


@pytest.fixture(scope="module")
def source_model():
    return build_tiny_model(0)


@pytest.fixture(scope="module")
def source_output(source_model):
    return segment(source_model)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory, source_model):
    path = tmp_path_factory.mktemp("release") / "skysense_o_fake.pth"
    fake_release_file(source_model, path)
    return path


def reference_layout(refspec_dir) -> Dict[str, tuple]:
    data = json.loads((refspec_dir / "skysense_o_state_dict.json").read_text())
    return {entry["key"]: tuple(entry["shape"]) for entry in data["state_dict"]}


# ---- the full release configuration ----------------------------------------------------------

def test_release_config_state_dict_matches_reference(refspec_dir):
    reference = reference_layout(refspec_dir)
    model = build_meta_model(release_cfg(tiny=False))
    layout = {key: tuple(value.shape) for key, value in model.state_dict().items()}

    skipped = sorted(set(reference) - set(layout))
    assert set(layout) <= set(reference)
    assert {key: reference[key] for key in layout} == layout
    assert {unused_key_group(key).name for key in skipped} == {"pixel_shuffle", "tokennizer_model"}
    assert len([key for key in skipped if key.startswith("pixel_shuffle_conv")]) == 4
    assert sum(p.numel() for p in model.parameters()) == INFERENCE_PARAMETERS


def test_legacy_tokenizer_keys_are_skipped(refspec_dir):
    data = json.loads((refspec_dir / "skysense_o_state_dict.json").read_text())
    legacy = {entry["key"]: torch.zeros(1) for entry in data["tokennizer_model_legacy_keys"]}
    model = build_meta_model(release_cfg(tiny=False))

    converted = convert_release_state_dict(legacy, model)

    assert len(legacy) == 104
    assert "tokennizer_model.0.auto_model.embeddings.position_ids" in legacy
    assert converted == {}


def test_pixel_shuffle_config_keeps_region_keys(refspec_dir):
    reference = reference_layout(refspec_dir)
    cfg = release_cfg("MODEL.SKYSENSE_O.LOSS.REGION_POOLING", "pixel_shuffle", tiny=False)
    model = build_meta_model(cfg)
    layout = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = {key: shape for key, shape in reference.items()
                if not key.startswith("tokennizer_model.")}

    assert layout == expected
    assert sum(p.numel() for p in model.parameters()) == (
        INFERENCE_PARAMETERS + PIXEL_SHUFFLE_PARAMETERS)


def test_meta_build_keeps_computed_buffers_real():
    model = build_meta_model(release_cfg(tiny=False))

    buffers = dict(model.named_buffers())
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in buffers.values())
    assert buffers["sem_seg_head.clip_model.attn_mask"].shape == (77, 77)
    index = buffers["sem_seg_head.clip_model.visual.stages.3.blocks.0.attn.w_msa."
                    "relative_position_index"]
    assert index.shape == (256, 256)


def test_release_config_inference_protocol():
    cfg = release_cfg(tiny=False)
    node = cfg.MODEL.SKYSENSE_O

    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (640, 2560)
    assert cfg.INPUT.SIZE_DIVISIBILITY == 32
    assert (node.BACKBONE.NAME, node.BACKBONE.ARCH) == ("SkySenseCLIPBackbone", "huge")
    assert node.BACKBONE.IMAGE_SIZE == 384
    assert (node.INFERENCE.MODE, node.INFERENCE.KEEP_ASPECT_RATIO) == ("whole", False)
    assert list(node.TEXT.TEMPLATES) == ["A remote sensing image of a {}."]
    assert len(cfg.DATASETS.TEST) == 9
    for name in cfg.DATASETS.TEST:
        assert name.endswith("_test_release")
        assert name in DatasetCatalog.list()


def test_sliding_config_changes_only_inference():
    release = release_cfg(tiny=False)
    sliding = release_cfg(tiny=False, config=SLIDING_CONFIG)
    inference = sliding.MODEL.SKYSENSE_O.INFERENCE

    assert (inference.MODE, inference.WINDOW, inference.STRIDE) == ("sliding", 384, 256)
    assert inference.KEEP_ASPECT_RATIO
    for node in ("BACKBONE", "DECODER", "TEXT"):
        assert sliding.MODEL.SKYSENSE_O[node] == release.MODEL.SKYSENSE_O[node]
    assert sliding.DATASETS.TEST == release.DATASETS.TEST


def test_training_config_recipe():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(TRAINING_CONFIG))
    node = cfg.MODEL.SKYSENSE_O

    assert cfg.DATASETS.TRAIN == ("skysa_train",)
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == (
        "ADAMW", 0.0002, 0.0001)
    assert node.BACKBONE.LR_MULTIPLIER == 0.01
    assert (cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.MAX_ITER) == ("WarmupCosineLR", 80000)
    assert (cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (
        "full_model", 0.01)
    assert tuple(cfg.INPUT.CROP.SIZE) == (384, 384)
    assert cfg.INPUT.COLOR_AUG_SSD
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.DATASETS.SKYSA.TEXT_BATCH == 100
    assert list(cfg.DATASETS.SKYSA.SAMPLING_HYPER) == [1, 3, 9, 10]
    assert (node.LOSS.REGION_CONTRAST_WEIGHT, node.LOSS.REGULAR_WEIGHT) == (0.4, 0.4)
    assert node.BACKBONE.CHECKPOINT.endswith(".ckpt")


@pytest.mark.parametrize("protocol", ["release", "sliding"])
def test_eval_configs_name_registered_benchmarks(protocol):
    suffix = "" if protocol == "release" else "_sliding"
    files = sorted(EVAL_CONFIG_DIR.glob(f"*{suffix}.yaml"))
    files = [path for path in files if path.stem.endswith("_sliding") == (protocol == "sliding")]

    assert len(files) == 10
    for path in files:
        cfg = release_cfg(tiny=False, config=path)
        benchmark = path.stem.replace("_sliding", "")
        assert cfg.DATASETS.TEST == (f"{benchmark}_test_release",)
        assert cfg.DATASETS.TEST[0] in DatasetCatalog.list()
        assert cfg.MODEL.SKYSENSE_O.INFERENCE.MODE == ("whole" if protocol == "release"
                                                       else "sliding")


# ---- converting and loading a release checkpoint ---------------------------------------------

def test_checkpointer_loads_release_file(release_file, source_output, caplog):
    model = build_tiny_model(1)
    with caplog.at_level(logging.INFO, logger="skysense_o.release"):
        SkySenseOCheckpointer(model).load(str(release_file))

    reports = [r.getMessage() for r in caplog.records if "inference does not use" in r.message]
    assert len(reports) == 1
    assert "4 pixel_shuffle.* keys" in reports[0]
    assert f"{len(FAKE_TOKENIZER_ENTRIES)} tokennizer_model.* keys" in reports[0]
    assert "naming 0.auto_model.* and 0.model.*" in reports[0]
    assert torch.equal(segment(model), source_output)


def assert_same_state(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    expected_state = expected.state_dict()
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    for key, value in state.items():
        assert torch.equal(value, expected_state[key]), key


def test_checkpointer_load_equals_direct_load(source_model, release_file):
    direct = build_tiny_model(2)
    direct.load_state_dict(source_model.state_dict())
    through_file = build_tiny_model(3)
    SkySenseOCheckpointer(through_file).load(str(release_file))

    assert_same_state(through_file, direct)


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_bad_key_raises_naming_it(source_model, tmp_path, change):
    key = "sem_seg_head.transformer.conv1.weight"
    state_dict = dict(source_model.state_dict())
    if change == "missing":
        del state_dict[key]
    else:
        state_dict[key] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state_dict}, path)

    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        SkySenseOCheckpointer(build_tiny_model(4)).load(str(path))


def test_unknown_key_raises_naming_it(source_model, tmp_path):
    state_dict = dict(source_model.state_dict())
    state_dict["decoder_extra.weight"] = torch.zeros(2)
    path = tmp_path / "extra.pth"
    torch.save({"model": state_dict}, path)

    with pytest.raises(CheckpointMismatchError, match=r"decoder_extra\.weight"):
        SkySenseOCheckpointer(build_tiny_model(4)).load(str(path))


def test_non_strict_load_keeps_the_rest(source_model, tmp_path, caplog):
    key = "visual_guidance_conv1.weight"
    state_dict = dict(source_model.state_dict())
    del state_dict[key]
    path = tmp_path / "partial.pth"
    torch.save({"model": state_dict}, path)
    model = build_tiny_model(5)
    before = model.visual_guidance_conv1.weight.detach().clone()

    with caplog.at_level(logging.WARNING):
        SkySenseOCheckpointer(model, strict=False).load(str(path))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(key in message and "missing" in message for message in warnings)
    assert torch.equal(model.visual_guidance_conv1.weight, before)
    assert torch.equal(model.visual_guidance_conv2.weight,
                       source_model.visual_guidance_conv2.weight)


def test_stored_buffers_are_recomputed(source_model, tmp_path, caplog):
    mask_key = "sem_seg_head.transformer.layers.0.swin_block.block_2.attn_mask"
    index_key = ("sem_seg_head.clip_model.visual.stages.0.blocks.1.attn.w_msa."
                 "relative_position_index")
    table_key = "sem_seg_head.clip_model.visual.stages.3.blocks.0.attn.w_msa.relative_coords_table"
    state_dict = dict(source_model.state_dict())
    expected = {key: state_dict[key].clone() for key in (mask_key, index_key, table_key)}
    state_dict[mask_key] = torch.zeros_like(state_dict[mask_key])
    state_dict[index_key] = torch.zeros_like(state_dict[index_key])
    state_dict[table_key] = torch.ones_like(state_dict[table_key])
    path = tmp_path / "buffers.pth"
    torch.save({"model": state_dict}, path)
    model = build_tiny_model(6)

    with caplog.at_level(logging.WARNING, logger="skysense_o.release"):
        SkySenseOCheckpointer(model).load(str(path))

    loaded = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert any("3 stored deterministic buffers differ" in r.getMessage() for r in caplog.records)


def test_buffers_absent_from_file_load(source_model, tmp_path):
    state_dict = {key: value for key, value in source_model.state_dict().items()
                  if not key.endswith(("relative_position_index", "relative_coords_table",
                                       "attn_mask"))}
    path = tmp_path / "no_buffers.pth"
    torch.save({"model": state_dict}, path)
    model = build_tiny_model(7)

    SkySenseOCheckpointer(model).load(str(path))

    assert_same_state(model, source_model)


def test_pixel_shuffle_model_loads_region_keys(tmp_path):
    overrides = ("MODEL.SKYSENSE_O.LOSS.REGION_POOLING", "pixel_shuffle")
    source = build_tiny_model(8, *overrides)
    path = tmp_path / "region.pth"
    fake_release_file(source, path, extra_region=False)
    model = build_tiny_model(9, *overrides)

    SkySenseOCheckpointer(model).load(str(path))

    assert torch.equal(model.pixel_shuffle_conv0.weight, source.pixel_shuffle_conv0.weight)
    assert torch.equal(model.pixel_shuffle_conv1.bias, source.pixel_shuffle_conv1.bias)


def test_pixel_shuffle_model_needs_region_keys(source_model, release_file, tmp_path):
    state_dict = dict(source_model.state_dict())
    path = tmp_path / "no_region.pth"
    torch.save({"model": state_dict}, path)
    model = build_tiny_model(10, "MODEL.SKYSENSE_O.LOSS.REGION_POOLING", "pixel_shuffle")

    with pytest.raises(CheckpointMismatchError, match=r"pixel_shuffle_conv0\.weight"):
        SkySenseOCheckpointer(model).load(str(path))


def test_ddp_prefix_is_removed(source_model):
    state_dict = {"module." + key: value for key, value in source_model.state_dict().items()}
    state_dict["module.tokennizer_model.0.model.pooler.dense.bias"] = torch.zeros(4)

    converted = convert_release_state_dict(state_dict, source_model)

    assert not any(key.startswith(("module.", "tokennizer_model.")) for key in converted)
    assert "sem_seg_head.clip_model.logit_scale" in converted


def test_unused_groups_name_their_reason():
    names = {group.name: group for group in RELEASE_UNUSED_KEY_GROUPS}

    assert unused_key_group("pixel_shuffle_conv0.weight") is names["pixel_shuffle"]
    assert unused_key_group("tokennizer_model.0.model.pooler.dense.bias") is names[
        "tokennizer_model"]
    assert unused_key_group("sem_seg_head.transformer.conv1.weight") is None
    assert all(group.reason for group in RELEASE_UNUSED_KEY_GROUPS)


# ---- the SkySense-CLIP pre-training file ------------------------------------------------------

def fake_pretrain_file(source_model, path: Path) -> None:
    backbone_state = source_model.backbone.state_dict()
    clip_part = {key: value for key, value in backbone_state.items()
                 if not key.startswith("visual.")}
    model_part = {"backbone_gep." + key[len("visual."):]: value
                  for key, value in backbone_state.items() if key.startswith("visual.")}
    # The release's file also holds SkySense's multispectral and SAR branches.
    model_part["backbone_s2.patch_embed.projection.weight"] = torch.randn(4, 10, 4, 4)
    model_part["backbone_s1.stages.0.norm.bias"] = torch.randn(4)
    model_part["fusion.weight"] = torch.randn(2, 2)
    torch.save({"clip": clip_part, "model": model_part}, path)


def test_pretrain_file_loads_through_backbone_checkpoint(source_model, tmp_path, caplog):
    path = tmp_path / "skysense_clip.ckpt"
    fake_pretrain_file(source_model, path)

    with caplog.at_level(logging.INFO):
        torch.manual_seed(11)
        model = META_ARCH_REGISTRY.get("SkySenseO")(
            release_cfg("MODEL.SKYSENSE_O.BACKBONE.CHECKPOINT", str(path)))

    expected = source_model.backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    reports = [r.getMessage() for r in caplog.records if "ignored 3 entries" in r.getMessage()]
    assert len(reports) == 1
    assert "model.backbone_s2.patch_embed.projection.weight" in reports[0]
    assert "model.fusion.weight" in reports[0]


def test_pretrain_file_as_model_weights_is_rejected(source_model, tmp_path):
    path = tmp_path / "skysense_clip.ckpt"
    fake_pretrain_file(source_model, path)

    with pytest.raises(ValueError, match="BACKBONE.CHECKPOINT"):
        SkySenseOCheckpointer(build_tiny_model(12)).load(str(path))


# ---- low-memory loading ------------------------------------------------------------------------

def test_low_memory_load_equals_normal_load(source_model, release_file, source_output):
    cfg = release_cfg()
    low = build_model_for_inference(cfg, release_file, "cpu", low_memory=True)
    normal = build_model_for_inference(cfg, release_file, "cpu", low_memory=False)

    assert not low.training
    assert not normal.training
    assert not any(p.is_meta for p in low.parameters())
    assert_same_state(normal, source_model)
    assert_same_state(low, source_model)
    assert torch.equal(segment(low), source_output)


def test_low_memory_load_casts_half_file(source_model, tmp_path):
    state_dict = {key: value.half() if value.is_floating_point() else value
                  for key, value in source_model.state_dict().items()}
    path = tmp_path / "half.pth"
    torch.save({"model": state_dict}, path)

    model = build_model_for_inference(release_cfg(), path, "cpu", low_memory=True)

    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weights = model.sem_seg_head.transformer.conv1.weight
    expected = source_model.sem_seg_head.transformer.conv1.weight
    assert torch.allclose(weights, expected, atol=1e-3, rtol=1e-3)


def test_low_memory_partial_load_is_rejected(source_model, tmp_path):
    state_dict = dict(source_model.state_dict())
    del state_dict["visual_guidance_conv2.bias"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state_dict}, path)
    cfg = release_cfg("MODEL.SKYSENSE_O.WEIGHTS_STRICT", False)

    with pytest.raises(CheckpointMismatchError, match=r"visual_guidance_conv2\.bias"):
        build_model_for_inference(cfg, path, "cpu", low_memory=True)


def test_low_memory_load_ignores_backbone_checkpoint(source_model, release_file):
    cfg = release_cfg("MODEL.SKYSENSE_O.BACKBONE.CHECKPOINT", "missing/skysense_clip.ckpt")

    model = build_model_for_inference(cfg, release_file, "cpu", low_memory=True)

    assert_same_state(model, source_model)


def test_open_clip_backbone_falls_back_to_copy(tmp_path, caplog):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "quickstart.yaml"))
    torch.manual_seed(13)
    source = META_ARCH_REGISTRY.get("SkySenseO")(cfg)
    path = tmp_path / "quickstart.pth"
    torch.save({"model": source.state_dict()}, path)

    with caplog.at_level(logging.WARNING, logger="skysense_o.release"):
        model = build_model_for_inference(cfg, path, "cpu", low_memory=True)

    assert_same_state(model, source)
    assert any("cannot be built on the meta device" in r.getMessage() for r in caplog.records)


def test_release_vectors_through_release_file(refspec_dir, tmp_path):
    vectors = torch.load(refspec_dir / "vectors" / "skysense_o_inference_tiny.pt",
                         weights_only=True)
    state_dict = dict(vectors["state_dict"])
    token_embedding = torch.zeros(49408, 64)
    token_embedding[vectors["token_embedding_rows"]] = vectors["token_embedding_values"]
    state_dict["sem_seg_head.clip_model.token_embedding.weight"] = token_embedding
    state_dict.update(FAKE_TOKENIZER_ENTRIES)
    path = tmp_path / "vectors_release.pth"
    torch.save({"model": state_dict}, path)
    model = build_model_for_inference(release_cfg(), path, "cpu", low_memory=True)
    inputs = {key: vectors["input"][key] for key in ("image", "height", "width")}
    inputs["texts"] = CLASS_NAMES

    with torch.no_grad():
        output = model([inputs])[0]["sem_seg"]

    assert torch.allclose(output, vectors["output"], atol=1e-5, rtol=0)


# A mid-size model (about 75 million parameters, 286 MiB) whose peak memory is measured in a
# fresh process, over the load and one read of every parameter.
_RSS_OVERRIDES = [
    "MODEL.SKYSENSE_O.BACKBONE.ARCH", "custom",
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.EMBED_DIMS", 96,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.DEPTHS", [2, 2, 6, 2],
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.NUM_HEADS", [3, 6, 12, 24],
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.EMBED_DIM", 512,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_WIDTH", 512,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_LAYERS", 6,
    "MODEL.SKYSENSE_O.BACKBONE.SKYSENSE_CLIP.TEXT_HEADS", 8,
]

# The child reads its peak from /proc/self/status (VmHWM, the high-water mark of its own
# address space) rather than from getrusage's ru_maxrss. Linux carries the parent's peak over
# into ru_maxrss across fork and exec, and the pytest process is larger than the child.
_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from detectron2.config import get_cfg
    from skysense_o import add_skysense_o_config
    from skysense_o.release import build_model_for_inference

    def status_bytes(field):
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    config, weights, low_memory, overrides = sys.argv[1], sys.argv[2], sys.argv[3] == "1", \\
        json.loads(sys.argv[4])
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(overrides)
    baseline = status_bytes("VmRSS")
    model = build_model_for_inference(cfg, weights, "cpu", low_memory=low_memory)
    checksum = sum(float(p.detach().sum()) for p in model.parameters())
    peak = status_bytes("VmHWM")
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline": baseline, "peak": peak, "parameter_bytes": parameter_bytes,
                      "checksum": checksum}))
""")


def measure_load(weights: Path, low_memory: bool) -> Dict[str, float]:
    overrides = ["MODEL.DEVICE", "cpu"] + _RSS_OVERRIDES
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(RELEASE_CONFIG), str(weights),
         "1" if low_memory else "0", json.dumps(overrides)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_low_memory_peak_rss(tmp_path):
    cfg = release_cfg(*_RSS_OVERRIDES, tiny=False)
    meta_model = build_meta_model(cfg)
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: (torch.randn(value.shape, generator=generator) * 0.02 if value.is_meta
              else value.clone())
        for key, value in meta_model.state_dict().items()
    }
    parameter_names = {name for name, _ in meta_model.named_parameters()}
    expected_checksum = sum(float(value.sum()) for key, value in state_dict.items()
                            if key in parameter_names)
    path = tmp_path / "mid_size.pth"
    torch.save({"model": state_dict}, path)
    del state_dict

    numbers = measure_load(path, low_memory=True)
    growth = numbers["peak"] - numbers["baseline"]
    ratio = growth / numbers["parameter_bytes"]
    print(f"low-memory load: parameters {numbers['parameter_bytes'] / 2**20:.0f} MiB, "
          f"peak RSS growth {growth / 2**20:.0f} MiB ({ratio:.2f}x)")

    assert numbers["parameter_bytes"] > 200 * 2**20
    assert ratio < 2.5
    assert numbers["checksum"] == pytest.approx(expected_checksum, rel=1e-6, abs=1e-3)


# ---- the command line ------------------------------------------------------------------------

def test_train_net_eval_only_reads_release_file(release_file, tmp_path):
    data_root = tmp_path / "data"
    image_dir = data_root / "potsdam" / "img_dir" / "test"
    label_dir = data_root / "potsdam" / "ann_dir" / "test"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(
        image_dir / "tile.png")
    Image.fromarray(generator.integers(0, 6, (96, 128), dtype=np.uint8)).save(
        label_dir / "tile.png")
    config = tmp_path / "tiny_release.yaml"
    config.write_text(release_cfg().dump())
    output_dir = tmp_path / "output"

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--eval-only", "--config-file",
         str(config), "MODEL.WEIGHTS", str(release_file),
         "DATASETS.TEST", '("potsdam_test_release",)', "OUTPUT_DIR", str(output_dir),
         "INPUT.MIN_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={**os.environ, "DETECTRON2_DATASETS": str(data_root)},
    )

    assert result.returncode == 0, result.stderr[-2000:]
    log = (output_dir / "log.txt").read_text()
    assert "Skipped 10 checkpoint keys that inference does not use" in log
    assert "memory-mapped" in log
    summary = json.loads((output_dir / "results_summary.json").read_text())
    assert 0 <= summary["potsdam_test_release"]["mIoU"] <= 100
