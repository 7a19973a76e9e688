"""Tests of OpenCLIPBackbone on the SkySense-Tiny architecture (random weights, CPU)."""

import logging
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from skysense_o import add_skysense_o_config
from skysense_o.modeling import build_vl_backbone
from skysense_o.modeling.backbone import open_clip_backbone
from skysense_o.modeling.backbone.open_clip_backbone import (
    OpenCLIPBackbone,
    build_open_clip_model,
    register_model_configs,
)
from skysense_o.utils.weights import CheckpointMismatchError

TINY_DEPTH = 8
TINY_WIDTH = 128
TINY_EMBED_DIM = 256


def make_cfg(**backbone_keys):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    for key, value in backbone_keys.items():
        setattr(cfg.MODEL.SKYSENSE_O.BACKBONE, key, value)
    return cfg


def build_eval(cfg) -> OpenCLIPBackbone:
    backbone = build_vl_backbone(cfg)
    backbone.eval()
    return backbone


@pytest.fixture(scope="module")
def tiny_backbone() -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return build_eval(make_cfg())


def encode_all(backbone: OpenCLIPBackbone, images: torch.Tensor):
    """Return (dense embedding, guidance maps, pooled, text embeddings) without gradients."""
    with torch.no_grad():
        dense = backbone.encode_dense(images)
        pooled = backbone.encode_pooled(images)
        text = backbone.encode_text(backbone.tokenize(["a harbour", "bare soil"]))
    return dense.embedding, dense.guidance, pooled, text


def assert_same_outputs(first: OpenCLIPBackbone, second: OpenCLIPBackbone, size: int) -> None:
    images = torch.randn(2, 3, size, size)
    for a, b in zip(encode_all(first, images), encode_all(second, images)):
        if isinstance(a, list):
            for map_a, map_b in zip(a, b):
                torch.testing.assert_close(map_a, map_b)
        else:
            torch.testing.assert_close(a, b)


# ---- Building ----------------------------------------------------------------------------------


def test_tiny_builds_with_random_init_warning(caplog):
    with caplog.at_level(logging.WARNING):
        backbone = build_vl_backbone(make_cfg(IMAGE_SIZE=64))
    assert isinstance(backbone, OpenCLIPBackbone)
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("skysense_o") and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "random weights" in warnings[0]
    assert "MODEL.WEIGHTS" in warnings[0]
    assert "SkySense-Tiny" in warnings[0]


def test_tiny_attributes(tiny_backbone):
    assert tiny_backbone.embed_dim == TINY_EMBED_DIM
    assert tiny_backbone.dense_stride == 16
    assert tiny_backbone.guidance_channels == (TINY_WIDTH, TINY_WIDTH)
    assert tiny_backbone.guidance_strides == (16, 16)
    assert tiny_backbone.guidance_layers == (3, 7)
    expected_mean = tuple(255.0 * value for value in open_clip.OPENAI_DATASET_MEAN)
    expected_std = tuple(255.0 * value for value in open_clip.OPENAI_DATASET_STD)
    assert tiny_backbone.pixel_mean == pytest.approx(expected_mean)
    assert tiny_backbone.pixel_std == pytest.approx(expected_std)
    assert tiny_backbone.model.visual.grid_size == (24, 24)


def test_register_model_configs_is_idempotent():
    register_model_configs()
    names = open_clip.list_models()
    register_model_configs()
    assert open_clip.list_models() == names
    assert "SkySense-Tiny" in names


@pytest.mark.parametrize(
    "batch, height, width", [(1, 384, 384), (3, 384, 384), (2, 224, 320), (1, 96, 48)]
)
def test_encode_dense_shapes(tiny_backbone, batch, height, width):
    with torch.no_grad():
        features = tiny_backbone.encode_dense(torch.randn(batch, 3, height, width))
    grid = (height // 16, width // 16)
    assert features.embedding.shape == (batch, TINY_EMBED_DIM, *grid)
    assert len(features.guidance) == 2
    for guidance in features.guidance:
        assert guidance.shape == (batch, TINY_WIDTH, *grid)
    assert torch.isfinite(features.embedding).all()


def test_pooled_and_text_shapes(tiny_backbone):
    with torch.no_grad():
        pooled = tiny_backbone.encode_pooled(torch.randn(3, 3, 384, 384))
        token_ids = tiny_backbone.tokenize(["farmland", "a parking lot", "river"])
        text = tiny_backbone.encode_text(token_ids)
    assert pooled.shape == (3, TINY_EMBED_DIM)
    assert token_ids.shape == (3, 77)
    assert token_ids.dtype == torch.int64
    assert text.shape == (3, TINY_EMBED_DIM)
    # The text embedding is not normalised.
    assert not torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_tokenize_rejects_plain_string(tiny_backbone):
    with pytest.raises(TypeError, match="river"):
        tiny_backbone.tokenize("river")


@pytest.mark.parametrize("height, width", [(384, 390), (100, 384)])
def test_encode_dense_rejects_non_multiple_size(tiny_backbone, height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}"):
        tiny_backbone.encode_dense(torch.randn(1, 3, height, width))


def test_encode_dense_rejects_wrong_channels(tiny_backbone):
    with pytest.raises(ValueError, match=r"\(1, 4, 64, 64\)"):
        tiny_backbone.encode_dense(torch.randn(1, 4, 64, 64))


# ---- Faithfulness of the layer-by-layer forward ---------------------------------------------


def test_pooled_matches_open_clip_encode_image(tiny_backbone):
    images = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        expected = tiny_backbone.model.encode_image(images)
        pooled = tiny_backbone.encode_pooled(images)
    torch.testing.assert_close(pooled, expected)


def test_dense_matches_open_clip_intermediates(tiny_backbone):
    visual = tiny_backbone.model.visual
    images = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        features = tiny_backbone.encode_dense(images)
        raw = visual.forward_intermediates(images, indices=[3, 7, TINY_DEPTH - 1])
        normed = visual.forward_intermediates(
            images, indices=[TINY_DEPTH - 1], normalize_intermediates=True
        )
    # open_clip returns B x width x h x w maps; the last one, after ln_post, is projected.
    last_normed = normed["image_intermediates"][0]
    expected_embedding = torch.einsum("bchw,ce->behw", last_normed, visual.proj)
    torch.testing.assert_close(features.embedding, expected_embedding)
    torch.testing.assert_close(features.guidance[0], raw["image_intermediates"][0])
    torch.testing.assert_close(features.guidance[1], raw["image_intermediates"][1])


def test_pooled_matches_for_average_pooling():
    torch.manual_seed(1)
    model = CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(
            image_size=32, patch_size=8, width=32, head_width=16, layers=3,
            pool_type="avg", final_ln_after_pool=True,
        ),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    backbone = OpenCLIPBackbone(
        model=model, tokenizer=open_clip.get_tokenizer("SkySense-Tiny"), guidance_layers=[0, 2]
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_pooled(images), model.encode_image(images))
        features = backbone.encode_dense(images)
    assert features.embedding.shape == (2, 24, 4, 4)


def test_interpolated_positions_match_resized_model():
    """Running at twice the native size equals a native model with resized positions."""
    torch.manual_seed(2)
    small = build_eval(make_cfg(IMAGE_SIZE=64))
    large = build_eval(make_cfg(IMAGE_SIZE=128))
    state = small.model.state_dict()
    positions = state["visual.positional_embedding"]
    grid = positions[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    state["visual.positional_embedding"] = torch.cat(
        [positions[:1], grid.permute(0, 2, 3, 1).reshape(64, -1)]
    )
    large.model.load_state_dict(state)
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            small.encode_dense(images).embedding, large.encode_dense(images).embedding
        )


def test_grad_checkpointing_gives_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(open_clip_backbone, "checkpoint", counting_checkpoint)
    torch.manual_seed(3)
    plain = build_vl_backbone(make_cfg(IMAGE_SIZE=32, VISUAL_FINETUNE="full"))
    checkpointed = build_vl_backbone(
        make_cfg(IMAGE_SIZE=32, VISUAL_FINETUNE="full", GRAD_CHECKPOINTING=True)
    )
    checkpointed.model.load_state_dict(plain.model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    for backbone in (plain, checkpointed):
        backbone.train()
        backbone.encode_dense(images).embedding.square().mean().backward()
    for (name, a), (_, b) in zip(
        plain.model.visual.named_parameters(), checkpointed.model.visual.named_parameters()
    ):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # Only the checkpointed backbone used checkpointing, once per block.
    assert len(calls) == TINY_DEPTH


# ---- Weights ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_backbone() -> OpenCLIPBackbone:
    torch.manual_seed(4)
    return build_eval(make_cfg(IMAGE_SIZE=64))


@pytest.mark.parametrize("layout", ["open_clip", "plain", "backbone"])
def test_checkpoint_reproduces_source(tmp_path, source_backbone, layout):
    model_state = source_backbone.model.state_dict()
    if layout == "open_clip":
        saved = {"epoch": 3, "state_dict": {"module." + k: v for k, v in model_state.items()}}
    elif layout == "plain":
        saved = dict(model_state)
    else:
        # This backbone's own state dict: every key starts with "model.".
        saved = source_backbone.state_dict()
    path = tmp_path / "weights.pt"
    torch.save(saved, path)

    loaded = build_eval(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(path)))
    assert_same_outputs(source_backbone, loaded, size=64)


def test_checkpoint_with_separate_text_tower_layout(tmp_path):
    """A CustomTextCLIP checkpoint (text tower under "text.") loads into a CLIP model."""
    torch.manual_seed(5)
    custom = open_clip.create_model("SkySense-Tiny", force_image_size=64, force_custom_text=True)
    assert any(key.startswith("text.") for key in custom.state_dict())
    path = tmp_path / "custom_text.pt"
    torch.save(custom.state_dict(), path)

    loaded = build_eval(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(path)))
    token_ids = loaded.tokenize(["a runway"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(token_ids), custom.encode_text(token_ids))


def test_checkpoint_safetensors(tmp_path, source_backbone):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source_backbone.model.state_dict().items()}, path)
    loaded = build_eval(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(path)))
    assert_same_outputs(source_backbone, loaded, size=64)


def test_checkpoint_at_other_image_size_is_resized(tmp_path, source_backbone):
    path = tmp_path / "weights.pt"
    torch.save(source_backbone.model.state_dict(), path)
    loaded = build_eval(make_cfg(IMAGE_SIZE=128, CHECKPOINT=str(path)))
    positions = loaded.model.visual.positional_embedding
    source_positions = source_backbone.model.visual.positional_embedding
    assert positions.shape == (1 + 8 * 8, TINY_WIDTH)
    torch.testing.assert_close(positions[0], source_positions[0])
    torch.testing.assert_close(loaded.model.visual.proj, source_backbone.model.visual.proj)


def test_checkpoint_wrong_shape_names_key(tmp_path, source_backbone):
    state = dict(source_backbone.model.state_dict())
    state["visual.proj"] = torch.zeros(TINY_WIDTH, TINY_EMBED_DIM + 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=re.escape("visual.proj")):
        build_vl_backbone(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(path)))


def test_checkpoint_missing_key_is_named(tmp_path, source_backbone):
    state = dict(source_backbone.model.state_dict())
    del state["ln_final.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=re.escape("ln_final.weight")):
        build_vl_backbone(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(path)))


def test_checkpoint_not_found(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_vl_backbone(make_cfg(IMAGE_SIZE=64, CHECKPOINT=str(missing)))


def test_pretrained_tag_goes_to_open_clip(monkeypatch, caplog):
    """A tag is handed to open_clip, which downloads the weights; here a fake stands in."""
    requests = []
    create_model = open_clip.create_model

    def fake_create_model(arch, **kwargs):
        requests.append((arch, kwargs))
        return create_model("SkySense-Tiny", force_image_size=32)

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with caplog.at_level(logging.WARNING):
        build_open_clip_model(arch="ViT-B/16", pretrained="openai", image_size=384)
    assert len(requests) == 1
    arch, kwargs = requests[0]
    assert arch == "ViT-B-16"
    assert kwargs["pretrained"] == "openai"
    assert kwargs["load_weights"] is True
    assert kwargs["force_image_size"] == 384
    assert not [r for r in caplog.records if r.name.startswith("skysense_o")]


# ---- Invalid configurations -------------------------------------------------------------------


def test_pretrained_and_checkpoint_together_rejected(tmp_path):
    with pytest.raises(ValueError, match="only one"):
        build_open_clip_model(
            arch="ViT-B-16", pretrained="openai", checkpoint=str(tmp_path / "x.pt"),
            image_size=224,
        )


@pytest.mark.parametrize("arch", ["RN50", "convnext_base", "coca_ViT-B-32"])
def test_non_vit_architecture_rejected(arch):
    with pytest.raises(ValueError, match=arch):
        build_open_clip_model(arch=arch, image_size=224)


@pytest.mark.parametrize(
    "vision_keys, fragment",
    [
        ({"layers": (1, 1, 1, 1), "width": 32}, "ModifiedResNet"),
        ({"layers": 1, "width": 32, "attentional_pool": True, "attn_pooler_heads": 2},
         "pools with attention"),
    ],
)
def test_unsupported_tower_rejected_directly(vision_keys, fragment):
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(image_size=64, patch_size=16, head_width=16, **vision_keys),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    with pytest.raises(ValueError, match=fragment):
        OpenCLIPBackbone(
            model=model, tokenizer=open_clip.get_tokenizer("SkySense-Tiny"),
            guidance_layers=[0, 0], arch="my-model",
        )


def test_unknown_architecture_rejected():
    with pytest.raises(ValueError, match="ViT-Q-99"):
        build_open_clip_model(arch="ViT-Q-99", image_size=224)


def test_unknown_pretrained_tag_rejected():
    # The tag is checked against open_clip's table before anything is downloaded.
    with pytest.raises(ValueError, match="no_such_tag"):
        build_open_clip_model(arch="ViT-B-16", pretrained="no_such_tag", image_size=224)


@pytest.mark.parametrize(
    "layers, fragment", [([3, 8], "layer 8"), ([-1, 2], "layer -1"), ([3], r"\[3\]")]
)
def test_invalid_guidance_layers_rejected(layers, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_vl_backbone(make_cfg(IMAGE_SIZE=64, GUIDANCE_LAYERS=layers))


def test_image_size_must_be_patch_multiple():
    with pytest.raises(ValueError, match="IMAGE_SIZE"):
        build_vl_backbone(make_cfg(IMAGE_SIZE=72))


def test_guidance_follows_configured_order():
    torch.manual_seed(6)
    backbone = build_eval(make_cfg(IMAGE_SIZE=64, GUIDANCE_LAYERS=[7, 1]))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = backbone.encode_dense(images)
        raw = backbone.model.visual.forward_intermediates(images, indices=[1, 7])
    torch.testing.assert_close(features.guidance[0], raw["image_intermediates"][1])
    torch.testing.assert_close(features.guidance[1], raw["image_intermediates"][0])


# ---- Fine-tuning ------------------------------------------------------------------------------

VISUAL_ATTENTION = re.compile(
    r"visual\.(transformer\.resblocks\.\d+\.attn\..*|positional_embedding|class_embedding)"
)
TEXT_ATTENTION = re.compile(r"(transformer\.resblocks\.\d+\.attn\..*|positional_embedding)")


def expected_trainable(names, visual_mode, text_mode):
    expected = set()
    for name in names:
        if name == "logit_scale":
            continue
        is_visual = name.startswith("visual.")
        mode = visual_mode if is_visual else text_mode
        pattern = VISUAL_ATTENTION if is_visual else TEXT_ATTENTION
        if mode == "full" or (mode == "attention" and pattern.fullmatch(name)):
            expected.add(name)
    return expected


@pytest.fixture(scope="module")
def finetune_backbone() -> OpenCLIPBackbone:
    torch.manual_seed(7)
    return build_vl_backbone(make_cfg(IMAGE_SIZE=32))


@pytest.mark.parametrize(
    "visual_mode, text_mode",
    [("frozen", "frozen"), ("attention", "attention"), ("full", "frozen"), ("frozen", "full"),
     ("attention", "full")],
)
def test_set_finetune_selects_parameters(finetune_backbone, visual_mode, text_mode):
    backbone = finetune_backbone
    backbone.set_finetune(visual_mode, text_mode)
    names = [name for name, _ in backbone.model.named_parameters()]
    trainable = {name for name, p in backbone.model.named_parameters() if p.requires_grad}
    expected = expected_trainable(names, visual_mode, text_mode)
    assert trainable == expected
    if visual_mode == "attention":
        assert "visual.transformer.resblocks.0.attn.in_proj_weight" in trainable
        assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in trainable

    # After a backward pass through both towers, exactly the trainable parameters have grads.
    backbone.model.zero_grad(set_to_none=True)
    backbone.train()
    features = backbone.encode_dense(torch.randn(1, 3, 32, 32))
    text = backbone.encode_text(backbone.tokenize(["a pond"]))
    loss = features.embedding.sum() + sum(g.sum() for g in features.guidance) + text.sum()
    if loss.requires_grad:
        loss.backward()
    with_grad = {name for name, p in backbone.model.named_parameters() if p.grad is not None}
    assert with_grad == expected


def test_text_parameters_cover_text_tower(finetune_backbone):
    text_ids = {id(p) for p in finetune_backbone.text_parameters()}
    for name, parameter in finetune_backbone.model.named_parameters():
        in_text = not name.startswith("visual.") and name != "logit_scale"
        assert (id(parameter) in text_ids) == in_text, name


def test_set_finetune_rejects_invalid_mode(finetune_backbone):
    with pytest.raises(ValueError, match="'lora'"):
        finetune_backbone.set_finetune("lora", "full")
    with pytest.raises(ValueError, match="'partial'"):
        build_vl_backbone(make_cfg(IMAGE_SIZE=32, TEXT_FINETUNE="partial"))
