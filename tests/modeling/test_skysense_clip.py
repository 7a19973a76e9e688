"""Tests of the SkySense-CLIP backbone: release vectors, key layout, weight files, fine-tuning."""

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import get_cfg

from skysense_o.config import add_skysense_o_config
from skysense_o.modeling.backbone import VisionLanguageBackbone, build_vl_backbone
from skysense_o.modeling.backbone.skysense_clip import (
    RELEASE_PIXEL_MEAN,
    RELEASE_PIXEL_STD,
    SkySenseCLIPBackbone,
    causal_attention_mask,
    convert_skysense_clip_pretrain,
    tokenize,
)
from skysense_o.utils.weights import (
    CheckpointMismatchError,
    load_state_dict_checked,
    load_weights_file,
)

# Tolerances from the test vectors' README: image features, then everything else.
IMAGE_ATOL = 5e-4
ATOL = 1e-5
RELEASE_PREFIX = "sem_seg_head.clip_model."

TINY_KWARGS = dict(
    arch={"embed_dims": 12, "depths": [2, 2, 2, 2], "num_heads": [2, 4, 8, 16],
          "extra_norm_every_n_blocks": 2},
    window_sizes=(8, 8, 8, 16), pretrained_window_sizes=(0, 0, 0, 8), embed_dim=32,
    text_width=64, text_layers=2, text_heads=4,
)


def _tiny_backbone(**kwargs) -> SkySenseCLIPBackbone:
    return SkySenseCLIPBackbone(**{**TINY_KWARGS, **kwargs})


@pytest.fixture(scope="module")
def clip_vectors(refspec_dir):
    return torch.load(refspec_dir / "vectors" / "skysense_clip_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def release_model(clip_vectors):
    """The tiny model of the vectors, built from their clip config and loaded strictly."""
    config = json.loads(clip_vectors["config"])
    clip = yaml.safe_load(config["clip_config_yaml"])["clip"]
    vision, text = clip["vision_cfg"], clip["text_cfg"]
    model = SkySenseCLIPBackbone(
        arch=vision["arch"], window_sizes=vision["window_size"],
        pretrained_window_sizes=vision["pretrained_window_sizes"], embed_dim=clip["embed_dim"],
        text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
        context_length=text["context_length"], vocab_size=text["vocab_size"],
    )
    state = dict(clip_vectors["state_dict"])
    # The vectors store only the token-embedding rows that their prompts use.
    embedding = torch.zeros(text["vocab_size"], text["width"])
    embedding[clip_vectors["token_embedding_rows"]] = clip_vectors["token_embedding_values"]
    state["token_embedding.weight"] = embedding
    load_state_dict_checked(model, state, ignore_missing=model.recomputed_buffer_keys())
    return model.eval()


@pytest.fixture(scope="module")
def release_outputs(release_model, clip_vectors):
    images = clip_vectors["input"]["image"].float()
    token_ids = clip_vectors["input"]["token_ids"]
    with torch.no_grad():
        return {
            "dense": release_model.encode_image(images, dense=True),
            "features": release_model.encode_dense(images),
            "pooled": release_model.encode_pooled(images),
            "pooled_normalized": release_model.encode_image(images, normalize=True),
            "text": release_model.encode_text(token_ids),
            "text_normalized": release_model.encode_text(token_ids, normalize=True),
        }


def test_dense_matches_vectors(release_outputs, clip_vectors):
    expected = clip_vectors["output"]["dense"]
    assert len(release_outputs["dense"]) == len(expected) == 4
    for actual, reference in zip(release_outputs["dense"], expected):
        assert actual.shape == reference.shape
        torch.testing.assert_close(actual, reference, atol=IMAGE_ATOL, rtol=0)


def test_encode_dense_matches_vectors(release_outputs, clip_vectors):
    expected = clip_vectors["output"]["dense"]
    features = release_outputs["features"]
    torch.testing.assert_close(features.embedding, expected[3], atol=IMAGE_ATOL, rtol=0)
    assert len(features.guidance) == 2
    torch.testing.assert_close(features.guidance[0], expected[1], atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(features.guidance[1], expected[0], atol=IMAGE_ATOL, rtol=0)


def test_pooled_keeps_batch_axis(release_outputs, clip_vectors):
    # The release squeezes the batch axis away for one image; this backbone keeps it.
    assert release_outputs["pooled"].shape == (1, 32)
    assert release_outputs["pooled_normalized"].shape == (1, 32)
    torch.testing.assert_close(release_outputs["pooled"][0], clip_vectors["output"]["pooled"],
                               atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(release_outputs["pooled_normalized"][0],
                               clip_vectors["output"]["pooled_normalized"], atol=IMAGE_ATOL, rtol=0)


def test_text_matches_vectors(release_outputs, clip_vectors):
    for key in ("text", "text_normalized"):
        assert release_outputs[key].shape == (8, 32)
        torch.testing.assert_close(release_outputs[key], clip_vectors["output"][key],
                                   atol=ATOL, rtol=0)


def test_tokenize_matches_vector_prompts(release_model, clip_vectors):
    prompts = json.loads(clip_vectors["config"])["prompts"]
    token_ids = release_model.tokenize(prompts)
    assert token_ids.dtype == torch.int64
    assert torch.equal(token_ids, clip_vectors["input"]["token_ids"])


def test_tokenizer_cases(refspec_dir):
    cases = torch.load(refspec_dir / "vectors" / "tokenizer_cases.pt", weights_only=True)
    assert len(cases["input"]) == 13
    token_ids = tokenize(cases["input"])
    assert token_ids.shape == (13, 77)
    for index, prompt in enumerate(cases["input"]):
        assert torch.equal(token_ids[index], cases["output"][index]), prompt


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match="int value 3"):
        tokenize(["a road", 3])


def test_causal_mask_matches_real_buffer(refspec_dir):
    stored = torch.load(refspec_dir / "vectors" / "buffers_real_config.pt", weights_only=True)
    assert torch.equal(causal_attention_mask(77), stored["text_causal_attn_mask_77"])


def test_encode_text_rejects_wrong_length(release_model):
    with pytest.raises(ValueError, match=r"N x 77.*\(2, 10\)"):
        release_model.encode_text(torch.zeros(2, 10, dtype=torch.int64))


def test_encode_dense_non_square_map(release_model):
    images = torch.randn(1, 3, 272, 304)
    with torch.no_grad():
        features = release_model.encode_dense(images)
        stages = release_model.visual(images)

    assert features.embedding.shape == (1, 32, 17, 19)
    assert [g.shape for g in features.guidance] == [(1, 24, 34, 38), (1, 12, 68, 76)]
    # Pixel (y, x) of the embedding is the projection of stage-3 pixel (y, x).
    expected = stages[3][0, :, 5, 11] @ release_model.vision_projection
    torch.testing.assert_close(features.embedding[0, :, 5, 11], expected, atol=1e-5, rtol=1e-5)


def test_interface_attributes(release_model):
    assert isinstance(release_model, VisionLanguageBackbone)
    assert release_model.embed_dim == 32
    assert release_model.dense_stride == 16
    assert release_model.guidance_channels == (24, 12)
    assert release_model.guidance_strides == (8, 4)
    assert release_model.pixel_mean == RELEASE_PIXEL_MEAN == (123.675, 116.28, 103.53)
    assert release_model.pixel_std == RELEASE_PIXEL_STD == (58.395, 57.12, 57.375)


def test_text_parameters_are_text_tower(release_model):
    names = {id(p): n for n, p in release_model.named_parameters()}
    text_names = {names[id(p)] for p in release_model.text_parameters()}
    assert "token_embedding.weight" in text_names
    assert "text_projection" in text_names
    assert "transformer.resblocks.1.mlp.c_proj.bias" in text_names
    assert not any(n.startswith("visual.") for n in text_names)
    assert "vision_projection" not in text_names and "logit_scale" not in text_names


def _release_clip_entries(refspec_dir: Path) -> dict:
    layout = json.loads((refspec_dir / "skysense_o_state_dict.json").read_text())
    return {entry["key"][len(RELEASE_PREFIX):]: entry for entry in layout["state_dict"]
            if entry["key"].startswith(RELEASE_PREFIX)}


def test_huge_meta_state_dict_matches_release(refspec_dir):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.MODEL.SKYSENSE_O.BACKBONE.NAME = "SkySenseCLIPBackbone"
    cfg.MODEL.SKYSENSE_O.BACKBONE.ARCH = "huge"
    with torch.device("meta"):
        model = build_vl_backbone(cfg)

    state = model.state_dict()
    expected = _release_clip_entries(refspec_dir)
    assert list(state) == list(expected)
    for key, entry in expected.items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype) == "torch." + entry["dtype"], key
    assert "attn_mask" not in state
    assert model.attn_mask.shape == (77, 77)
    assert sum(p.numel() for p in model.parameters()) == 1_011_995_857


def test_from_config_custom_arch():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    backbone = cfg.MODEL.SKYSENSE_O.BACKBONE
    backbone.NAME = "SkySenseCLIPBackbone"
    backbone.ARCH = "custom"
    backbone.VISUAL_FINETUNE = "frozen"
    backbone.TEXT_FINETUNE = "full"
    clip = backbone.SKYSENSE_CLIP
    clip.EMBED_DIMS, clip.DEPTHS, clip.NUM_HEADS = 8, [1, 1, 2, 1], [1, 2, 4, 8]
    clip.EXTRA_NORM_EVERY_N_BLOCKS = 0
    clip.EMBED_DIM, clip.TEXT_WIDTH, clip.TEXT_LAYERS, clip.TEXT_HEADS = 16, 32, 1, 2

    model = build_vl_backbone(cfg)

    assert isinstance(model, SkySenseCLIPBackbone)
    assert model.visual.channels == [8, 16, 32, 64]
    assert model.vision_projection.shape == (64, 16)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("visual."))
    assert model.token_embedding.weight.requires_grad


def test_from_config_rejects_open_clip_arch_name():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.MODEL.SKYSENSE_O.BACKBONE.NAME = "SkySenseCLIPBackbone"
    cfg.MODEL.SKYSENSE_O.BACKBONE.ARCH = "ViT-B-16"
    with pytest.raises(ValueError, match="'ViT-B-16'"):
        build_vl_backbone(cfg)


def test_set_finetune_attention():
    model = _tiny_backbone(visual_finetune="attention", text_finetune="attention")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    assert "visual.stages.0.blocks.0.attn.w_msa.qkv.weight" in trainable
    assert "visual.stages.3.blocks.1.attn.w_msa.q_bias" in trainable
    assert "visual.stages.2.blocks.0.attn.w_msa.cpb_mlp.0.weight" in trainable
    assert "visual.stages.1.blocks.1.attn.w_msa.logit_scale" in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" in trainable
    assert "positional_embedding" in trainable
    for frozen in ("visual.stages.0.blocks.0.attn.w_msa.proj.weight", "visual.norm3.weight",
                   "transformer.resblocks.0.attn.out_proj.weight", "token_embedding.weight",
                   "vision_projection", "text_projection", "logit_scale"):
        assert frozen not in trainable


def test_set_finetune_full_and_frozen():
    model = _tiny_backbone(visual_finetune="full", text_finetune="frozen")
    for name, param in model.named_parameters():
        visual = name.startswith("visual.") or name == "vision_projection"
        assert param.requires_grad == visual, name


def test_set_finetune_rejects_unknown_mode():
    model = _tiny_backbone()
    with pytest.raises(ValueError, match="'prompt'"):
        model.set_finetune("prompt", "full")
    with pytest.raises(ValueError, match="'lora'"):
        _tiny_backbone(text_finetune="lora")


def _split_pretrain(state: dict) -> dict:
    """Lay a SkySenseCLIP state dict out as the SkySense-CLIP pre-training file does."""
    clip = {key: value for key, value in state.items() if not key.startswith("visual.")}
    # A stale image-tower copy in 'clip' must lose against the backbone_gep weights.
    clip["visual.norm0.weight"] = torch.zeros_like(state["visual.norm0.weight"])
    model = {"backbone_gep." + key[len("visual."):]: value
             for key, value in state.items() if key.startswith("visual.")}
    model["backbone_s2.patch_embed.projection.weight"] = torch.ones(4)
    model["head.fc.weight"] = torch.ones(2)
    return {"clip": clip, "model": model, "epoch": 7}


def test_convert_pretrain_reports_ignored_keys(caplog):
    state = _tiny_backbone().state_dict()
    with caplog.at_level(logging.INFO, logger="skysense_o.modeling.backbone.skysense_clip"):
        converted, ignored = convert_skysense_clip_pretrain(_split_pretrain(state))

    assert sorted(ignored) == ["epoch", "model.backbone_s2.patch_embed.projection.weight",
                               "model.head.fc.weight"]
    assert set(converted) == set(state)
    assert torch.equal(converted["visual.norm0.weight"], state["visual.norm0.weight"])
    assert sum("ignored 3 entries" in r.getMessage() for r in caplog.records) == 1


def test_convert_pretrain_rejects_bad_parts():
    with pytest.raises(ValueError, match="checkpoint\\['model'\\]"):
        convert_skysense_clip_pretrain({"clip": {}, "model": [1, 2]})


def test_pretrain_file_loads_strictly(tmp_path):
    source = _tiny_backbone()
    path = tmp_path / "skysense_clip_pretrain.pth"
    torch.save(_split_pretrain(source.state_dict()), path)

    model = _tiny_backbone(checkpoint=str(path))

    for (name, expected), (_, actual) in zip(source.named_parameters(), model.named_parameters()):
        assert torch.equal(actual, expected), name


def test_plain_state_dict_checkpoint_loads(tmp_path):
    source = _tiny_backbone()
    path = tmp_path / "skysense_clip.pth"
    torch.save({"state_dict": source.state_dict()}, path)

    model = _tiny_backbone(checkpoint=str(path))

    for (name, expected), (_, actual) in zip(source.state_dict().items(),
                                             model.state_dict().items()):
        assert torch.equal(actual, expected), name


def test_checkpoint_with_missing_key_raises(tmp_path):
    state = _tiny_backbone().state_dict()
    del state["visual.stages.2.blocks.1.norm3.bias"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="stages.2.blocks.1.norm3.bias"):
        _tiny_backbone(checkpoint=str(path))


def test_missing_checkpoint_file_raises(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        _tiny_backbone(checkpoint=str(path))


class _RunsOnLoad:
    """Pickles as a call to ``_create_marker``, which unpickling would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_create_marker, (self.marker,))


def _create_marker(path: str) -> None:
    Path(path).write_text("code in the checkpoint ran")


def test_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    checkpoint = _split_pretrain(_tiny_backbone().state_dict())
    checkpoint["hook"] = _RunsOnLoad(marker)
    path = tmp_path / "malicious.pth"
    torch.save(checkpoint, path)

    with pytest.raises(ValueError, match="malicious.pth"):
        load_weights_file(path)
    with pytest.raises(ValueError, match="malicious.pth"):
        _tiny_backbone(checkpoint=str(path))
    assert not marker.exists()


def test_meta_build_then_assign_load(release_model, clip_vectors):
    with torch.device("meta"):
        model = _tiny_backbone()
    model.load_state_dict(release_model.state_dict(), assign=True)
    model.eval()
    token_ids = clip_vectors["input"]["token_ids"]

    assert torch.equal(model.attn_mask, causal_attention_mask(77))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(token_ids),
                                   release_model.encode_text(token_ids), atol=0, rtol=0)
