"""Tests of the cost-aggregation decoder against the release's test vectors and layout."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from skysense_o import add_skysense_o_config
from skysense_o.modeling.decoder import DECODER_REGISTRY, build_decoder
from skysense_o.modeling.decoder.cost_aggregation import (
    DROPPED_CLASS_LOGIT,
    CostAggregationDecoder,
    effective_window,
    shifted_window_mask,
)

ATOL = 1e-5
RELEASE_PREFIX = "sem_seg_head.transformer."
# Parameter count of the release's decoder (the "Aggregator" entry of its checkpoint).
RELEASE_PARAMETERS = 2_964_321


# Constructor arguments with the dimensions of the released SkySense-O model.
RELEASE_KWARGS = dict(
    text_guidance_in_dim=1024,
    appearance_guidance_in_dim=1024,
    text_guidance_dim=128,
    appearance_guidance_dim=128,
    decoder_guidance_in_dims=[256, 128],
    decoder_guidance_dims=[32, 16],
    upsample_dims=[64, 32],
    hidden_dim=128,
    num_layers=2,
    num_heads=4,
    window_size=12,
    pooling_size=[2, 2],
    feature_resolution=[24, 24],
    prompt_channels=1,
    class_budget=256,
    pad_classes=True,
    class_chunk=0,
)
# What the tiny test-vector decoder changes: hidden width 32 on 8 x 8 features.
TINY_CHANGES = dict(
    text_guidance_in_dim=32,
    appearance_guidance_in_dim=32,
    text_guidance_dim=16,
    appearance_guidance_dim=16,
    decoder_guidance_in_dims=[24, 12],
    decoder_guidance_dims=[8, 4],
    upsample_dims=[32, 16],
    hidden_dim=32,
    window_size=4,
    feature_resolution=[8, 8],
)


def release_kwargs(**overrides):
    """Return the release's constructor arguments with ``overrides`` applied."""
    return {**RELEASE_KWARGS, **overrides}


def tiny_kwargs(**overrides):
    """Return the tiny decoder's constructor arguments with ``overrides`` applied."""
    return {**RELEASE_KWARGS, **TINY_CHANGES, **overrides}


def random_inputs(batch_size, num_classes, height, width, kwargs, seed=0):
    """Random (image_embeds, text_embeds, guidance) that fit a decoder built from kwargs."""
    generator = torch.Generator().manual_seed(seed)
    embed_dim = kwargs["text_guidance_in_dim"]
    coarse, fine = kwargs["decoder_guidance_in_dims"]
    image = torch.randn(batch_size, embed_dim, height, width, generator=generator)
    text = torch.randn(
        batch_size, num_classes, kwargs["prompt_channels"], embed_dim, generator=generator
    )
    guidance = [
        image,
        torch.randn(batch_size, coarse, 2 * height, 2 * width, generator=generator),
        torch.randn(batch_size, fine, 4 * height, 4 * width, generator=generator),
    ]
    return image, F.normalize(text, dim=-1), guidance


def randomize_padding(decoder, seed=0):
    """Give the learned padding parameters non-zero values, as a trained checkpoint has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name.endswith(("padding_tokens", "padding_guidance")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def load_vector(refspec_dir, name):
    """Return the vector file's content and its decoder, loaded strictly with its weights."""
    data = torch.load(refspec_dir / "vectors" / name, weights_only=True)
    config = json.loads(data["config"])
    arguments = config["constructor_kwargs"]
    assert arguments["attention_type"] == "linear"

    decoder = CostAggregationDecoder(
        text_guidance_in_dim=arguments["text_guidance_dim"],
        appearance_guidance_in_dim=arguments["appearance_guidance_dim"],
        text_guidance_dim=arguments["text_guidance_proj_dim"],
        appearance_guidance_dim=arguments["appearance_guidance_proj_dim"],
        decoder_guidance_in_dims=arguments["decoder_guidance_dims"],
        decoder_guidance_dims=arguments["decoder_guidance_proj_dims"],
        upsample_dims=arguments["decoder_dims"],
        hidden_dim=arguments["hidden_dim"],
        num_layers=arguments["num_layers"],
        num_heads=arguments["nheads"],
        window_size=arguments["window_size"],
        pooling_size=arguments["pooling_size"],
        feature_resolution=arguments["feature_resolution"],
        prompt_channels=arguments["prompt_channel"],
        class_budget=arguments["pad_len"],
        pad_classes=True,
        class_chunk=0,
    )
    # The file leaves out the deterministic shift masks, so they come from the decoder itself.
    state_dict = dict(data["state_dict"])
    own_state = decoder.state_dict()
    for key in config["omitted_state_dict_keys"]:
        state_dict[key] = own_state[key]
    decoder.load_state_dict(state_dict, strict=True)
    return data, decoder.eval()


def vector_inputs(data):
    inputs = data["input"]
    guidance = [features.float() for features in inputs["appearance_guidance"]]
    return inputs["img_feats"].float(), inputs["text_feats"].float(), guidance


def test_vector_padded_classes(refspec_dir):
    data, decoder = load_vector(refspec_dir, "aggregator_tiny.pt")
    image, text, guidance = vector_inputs(data)
    with torch.no_grad():
        cost = decoder.cost_volume(image, text)
        logits = decoder(image, text, guidance)

    assert decoder.select_classes(cost) is None
    torch.testing.assert_close(cost, data["intermediate"]["correlation"], atol=ATOL, rtol=0)
    assert logits.shape == (1, 5, 32, 32)
    torch.testing.assert_close(logits, data["output"], atol=ATOL, rtol=0)


def test_vector_top_k_classes(refspec_dir):
    data, decoder = load_vector(refspec_dir, "aggregator_tiny_topk.pt")
    image, text, guidance = vector_inputs(data)
    with torch.no_grad():
        cost = decoder.cost_volume(image, text)
        logits = decoder(image, text, guidance)
    selected = decoder.select_classes(cost)

    torch.testing.assert_close(cost, data["intermediate"]["correlation"], atol=ATOL, rtol=0)
    expected_selected = data["selected_classes_sorted"]
    assert torch.equal(selected.sort(dim=1).values, expected_selected)
    assert logits.shape == (1, 11, 32, 32)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, data["output"], atol=ATOL, rtol=0)

    dropped = [index for index in range(11) if index not in expected_selected[0].tolist()]
    assert len(dropped) == 3
    assert torch.all(logits[0, dropped] == DROPPED_CLASS_LOGIT)
    assert torch.all(logits[0, expected_selected[0]] != DROPPED_CLASS_LOGIT)


@pytest.mark.parametrize("name", ["aggregator_tiny.pt", "aggregator_tiny_topk.pt"])
def test_class_chunk_keeps_logits(refspec_dir, name):
    data, decoder = load_vector(refspec_dir, name)
    image, text, guidance = vector_inputs(data)
    with torch.no_grad():
        whole = decoder(image, text, guidance)
        for module in decoder.modules():
            if hasattr(module, "class_chunk"):
                module.class_chunk = 2
        chunked = decoder(image, text, guidance)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_release_state_dict_layout(refspec_dir):
    layout = json.loads((refspec_dir / "skysense_o_state_dict.json").read_text())
    expected = [
        (entry["key"][len(RELEASE_PREFIX) :], entry["shape"], entry["dtype"])
        for entry in layout["state_dict"]
        if entry["key"].startswith(RELEASE_PREFIX)
    ]
    decoder = CostAggregationDecoder(**release_kwargs())
    actual = [
        (key, list(value.shape), str(value.dtype).replace("torch.", ""))
        for key, value in decoder.state_dict().items()
    ]

    assert len(actual) == 130
    assert actual == expected
    assert sum(parameter.numel() for parameter in decoder.parameters()) == RELEASE_PARAMETERS


def test_release_shift_mask_buffer(refspec_dir):
    buffers = torch.load(refspec_dir / "vectors" / "buffers_real_config.pt", weights_only=True)
    expected = buffers["aggregator_shift_attn_mask_24_w12_s6"]
    decoder = CostAggregationDecoder(**release_kwargs())

    assert torch.equal(shifted_window_mask(24, 24, 12, 6), expected)
    for layer in decoder.layers:
        assert torch.equal(layer.swin_block.block_2.attn_mask, expected)
        assert layer.swin_block.block_1.attn_mask is None


def test_effective_window_small_maps():
    assert effective_window(24, 24, 12, 6) == (12, 6)
    assert effective_window(16, 20, 12, 6) == (12, 6)
    assert effective_window(12, 30, 12, 6) == (12, 0)
    assert effective_window(30, 8, 12, 6) == (8, 0)


def test_window_mask_hides_padding():
    # A 5 x 6 map in windows of 4 pads to 8 x 8. Without a shift only padding is masked.
    mask = shifted_window_mask(5, 6, 4, 0)
    assert mask.shape == (4, 16, 16)
    # Window 0 (rows 0-3, cols 0-3) has no padding. In window 3 only row 4, cols 4-5 are real.
    assert torch.all(mask[0] == 0)
    real = torch.tensor([0, 1])
    padded = torch.arange(2, 16)
    assert torch.all(mask[3][real][:, real] == 0)
    assert torch.all(mask[3][real][:, padded] == -100)
    assert shifted_window_mask(8, 8, 4, 0) is None


def test_other_sizes_and_batch():
    kwargs = tiny_kwargs(class_budget=4)
    decoder = CostAggregationDecoder(**kwargs).eval()
    randomize_padding(decoder)
    for height, width in [(16, 20), (6, 10), (8, 8), (3, 12)]:
        image, text, guidance = random_inputs(2, 3, height, width, kwargs)
        with torch.no_grad():
            logits = decoder(image, text, guidance)
            single = decoder(image[1:], text[1:], [features[1:] for features in guidance])
        assert logits.shape == (2, 3, 4 * height, 4 * width)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits[1:], single, atol=1e-5, rtol=0)


def test_top_k_per_image():
    kwargs = tiny_kwargs(class_budget=4)
    decoder = CostAggregationDecoder(**kwargs).eval()
    image, text, guidance = random_inputs(2, 9, 8, 8, kwargs, seed=3)
    # Image 0 matches classes 0-3 best, image 1 classes 5-8.
    text[0, :4] = F.normalize(image[0, :, 0, 0], dim=0)
    text[1, 5:] = F.normalize(image[1, :, 0, 0], dim=0)
    with torch.no_grad():
        selected = decoder.select_classes(decoder.cost_volume(image, text))
        logits = decoder(image, text, guidance)

    assert selected.sort(dim=1).values.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert torch.all(logits[0, 4:] == DROPPED_CLASS_LOGIT)
    assert torch.all(logits[1, :5] == DROPPED_CLASS_LOGIT)
    assert torch.all(logits[0, :4] != DROPPED_CLASS_LOGIT)
    assert torch.all(logits[1, 5:] != DROPPED_CLASS_LOGIT)


def test_pad_classes_false():
    kwargs = tiny_kwargs(class_budget=16)
    image, text, guidance = random_inputs(1, 3, 8, 8, kwargs)
    padded = CostAggregationDecoder(**kwargs).eval()
    randomize_padding(padded)
    unpadded = CostAggregationDecoder(**dict(kwargs, pad_classes=False)).eval()
    unpadded.load_state_dict(padded.state_dict())
    other_budget = CostAggregationDecoder(**dict(kwargs, pad_classes=False, class_budget=3))
    other_budget.load_state_dict(padded.state_dict())
    other_budget.eval()

    with torch.no_grad():
        padded_logits = padded(image, text, guidance)
        unpadded_logits = unpadded(image, text, guidance)
        other_budget_logits = other_budget(image, text, guidance)

    # The learned padding tokens take part in class attention only when padding is on.
    assert (padded_logits - unpadded_logits).abs().max() > 1e-3
    torch.testing.assert_close(unpadded_logits, other_budget_logits, atol=1e-6, rtol=0)


def test_several_prompt_channels():
    kwargs = tiny_kwargs(prompt_channels=3)
    decoder = CostAggregationDecoder(**kwargs).eval()
    image, text, guidance = random_inputs(1, 2, 8, 8, kwargs)
    with torch.no_grad():
        assert decoder.cost_volume(image, text).shape == (1, 3, 2, 8, 8)
        assert decoder(image, text, guidance).shape == (1, 2, 32, 32)
    assert decoder.conv1.weight.shape == (32, 3, 7, 7)


def test_gradients_reach_every_parameter():
    kwargs = tiny_kwargs(class_budget=8)
    decoder = CostAggregationDecoder(**kwargs).train()
    image, text, guidance = random_inputs(2, 3, 8, 12, kwargs)
    decoder(image, text, guidance).square().mean().backward()

    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_release_dims_forward():
    kwargs = release_kwargs(class_chunk=2)
    decoder = CostAggregationDecoder(**kwargs).eval()
    image, text, guidance = random_inputs(1, 3, 24, 24, kwargs)
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    assert logits.shape == (1, 3, 96, 96)
    assert torch.isfinite(logits).all()


def make_cfg():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.MODEL.SKYSENSE_O.DECODER.NAME = "CostAggregationDecoder"
    return cfg


def test_from_config_release_dims(refspec_dir):
    backbone = SimpleNamespace(embed_dim=1024, dense_stride=16)
    decoder = build_decoder(make_cfg(), backbone)

    assert "CostAggregationDecoder" in DECODER_REGISTRY
    assert isinstance(decoder, CostAggregationDecoder)
    reference = CostAggregationDecoder(**release_kwargs())
    shapes = {key: value.shape for key, value in decoder.state_dict().items()}
    assert shapes == {key: value.shape for key, value in reference.state_dict().items()}
    assert decoder.layers[0].swin_block.block_2.feature_resolution == (24, 24)
    assert decoder.class_chunk == make_cfg().MODEL.SKYSENSE_O.DECODER.CLASS_CHUNK


def test_from_config_prompt_channels_and_size():
    cfg = make_cfg()
    cfg.MODEL.SKYSENSE_O.TEXT.TEMPLATES = ["a {}.", "an image of {}.", "{}"]
    cfg.MODEL.SKYSENSE_O.TEXT.ENSEMBLE = "channels"
    cfg.MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE = 224
    decoder = CostAggregationDecoder(cfg, SimpleNamespace(embed_dim=64, dense_stride=16))

    assert decoder.conv1.weight.shape == (128, 3, 7, 7)
    assert decoder.text_guidance_projection[0].weight.shape == (128, 64)
    assert decoder.guidance_projection[0].weight.shape == (128, 64, 3, 3)
    # 224 / 16 = 14 cells: the shifted block's stored mask is built for 14 x 14 (padded to 24).
    assert decoder.layers[0].swin_block.block_2.attn_mask.shape == (4, 144, 144)

    cfg.MODEL.SKYSENSE_O.TEXT.ENSEMBLE = "max"
    with pytest.raises(ValueError, match="'max'"):
        CostAggregationDecoder(cfg, SimpleNamespace(embed_dim=64, dense_stride=16))


def test_from_config_rejects_backbone():
    with pytest.raises(TypeError, match="dense_stride"):
        CostAggregationDecoder(make_cfg(), SimpleNamespace(embed_dim=64))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_dim": 30}, "hidden_dim .* = 30 must be divisible by num_heads"),
        ({"num_heads": 0}, "num_heads .* got 0"),
        ({"upsample_dims": [32, 50]}, "UPSAMPLE_DIMS entry 50"),
        ({"upsample_dims": [32, 8]}, "UPSAMPLE_DIMS entry 8"),
        ({"decoder_guidance_dims": [32, 4]}, "entry 32 must be smaller than HIDDEN_DIM"),
        ({"pooling_size": [2]}, r"pooling_size .* two values, got \[2\]"),
        ({"class_chunk": -1}, "class_chunk .* got -1"),
        ({"class_budget": 0}, "class_budget .* got 0"),
    ],
)
def test_invalid_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        CostAggregationDecoder(**tiny_kwargs(**overrides))


def test_invalid_inputs():
    kwargs = tiny_kwargs()
    decoder = CostAggregationDecoder(**kwargs).eval()
    image, text, guidance = random_inputs(1, 3, 8, 8, kwargs)

    with pytest.raises(ValueError, match=r"text_embeds must be 1 x T x 1 x 32.*\(1, 3, 2, 32\)"):
        decoder(image, text.repeat(1, 1, 2, 1), guidance)
    with pytest.raises(ValueError, match=r"text_embeds is empty \(T = 0 classes\)"):
        decoder(image, text[:, :0], guidance)
    with pytest.raises(ValueError, match="got 2 maps"):
        decoder(image, text, guidance[:2])
    with pytest.raises(ValueError, match=r"coarse guidance must be \(1, 24, 16, 16\)"):
        decoder(image, text, [guidance[0], guidance[1][..., :8], guidance[2]])
    with pytest.raises(ValueError, match=r"image_embeds must be B x E x h x w, got \(32, 8, 8\)"):
        decoder(image[0], text, guidance)
    small_image, small_text, small_guidance = random_inputs(1, 3, 1, 4, kwargs)
    with pytest.raises(ValueError, match="1 x 4 is smaller than the class-attention pooling"):
        decoder(small_image, small_text, small_guidance)
