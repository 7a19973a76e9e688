"""The whole inference pipeline against the released implementation's stored outputs."""

import json

import pytest
import torch
from torch import nn

from skysense_o.checkpoint import REGENERATED_BUFFER_SUFFIXES
from skysense_o.modeling.backbone.skysense_clip import SkySenseCLIPBackbone
from skysense_o.modeling.decoder.cost_aggregation import CostAggregationDecoder
from skysense_o.modeling.losses import SkySenseOCriterion
from skysense_o.modeling.meta_arch import SkySenseO, SkySenseOHead
from skysense_o.modeling.text_embeddings import TextEmbedder
from skysense_o.utils.weights import load_state_dict_checked


@pytest.fixture(scope="module")
def vectors(refspec_dir):
    return torch.load(refspec_dir / "vectors" / "skysense_o_inference_tiny.pt", weights_only=True)


def build_tiny_release_model(vectors) -> SkySenseO:
    config = json.loads(vectors["config"])
    head = config["head_kwargs"]
    settings = config["meta_arch_settings"]
    backbone = SkySenseCLIPBackbone(
        arch={"embed_dims": 12, "depths": [2, 2, 2, 2], "num_heads": [2, 4, 8, 16],
              "extra_norm_every_n_blocks": 2},
        embed_dim=32, text_width=64, text_layers=2, text_heads=4,
    )
    decoder = CostAggregationDecoder(
        text_guidance_in_dim=head["text_guidance_dim"],
        appearance_guidance_in_dim=head["appearance_guidance_dim"],
        text_guidance_dim=head["text_guidance_proj_dim"],
        appearance_guidance_dim=head["appearance_guidance_proj_dim"],
        decoder_guidance_in_dims=head["decoder_guidance_dims"],
        decoder_guidance_dims=head["decoder_guidance_proj_dims"],
        upsample_dims=head["decoder_dims"], hidden_dim=head["hidden_dims"],
        num_layers=head["num_layers"], num_heads=head["num_heads"],
        window_size=head["window_sizes"], pooling_size=head["pooling_sizes"],
        feature_resolution=head["feature_resolution"], prompt_channels=1, class_budget=256,
        pad_classes=True, class_chunk=0,
    )
    criterion = SkySenseOCriterion(pixel_weight=1.0, region_contrast_weight=0.0,
                                   regular_weight=0.0, contrast_scale=1.0, ignore_value=255)
    return SkySenseO(
        sem_seg_head=SkySenseOHead(backbone, decoder),
        visual_guidance_conv1=nn.Conv2d(24, 24, 1),
        visual_guidance_conv2=nn.Conv2d(12, 12, 1),
        text_embedder=TextEmbedder(templates=settings["prompt_templates"]),
        criterion=criterion,
        name_similarity=None,
        pixel_mean=settings["clip_pixel_mean"],
        pixel_std=settings["clip_pixel_std"],
        size_divisibility=settings["size_divisibility"],
        image_size=settings["clip_resolution"][0],
    )


def load_vector_weights(model: SkySenseO, vectors) -> None:
    state_dict = dict(vectors["state_dict"])
    width = model.backbone.token_embedding.weight.shape[1]
    token_embedding = torch.zeros(model.backbone.token_embedding.weight.shape[0], width)
    token_embedding[vectors["token_embedding_rows"]] = vectors["token_embedding_values"]
    state_dict["sem_seg_head.clip_model.token_embedding.weight"] = token_embedding
    regenerated = [k for k in model.state_dict() if k.endswith(REGENERATED_BUFFER_SUFFIXES)]
    missing, unexpected = load_state_dict_checked(model, state_dict, ignore_missing=regenerated)
    assert missing == []
    assert unexpected == []


def test_full_inference_matches_release(vectors):
    model = build_tiny_release_model(vectors)
    load_vector_weights(model, vectors)
    model.eval()
    config = json.loads(vectors["config"])
    inputs = {
        "image": vectors["input"]["image"],
        "height": vectors["input"]["height"],
        "width": vectors["input"]["width"],
        "texts": config["meta_arch_settings"]["test_classes"],
    }

    template = config["meta_arch_settings"]["prompt_templates"][0]
    tokens = model.backbone.tokenize([template.format(name) for name in inputs["texts"]])
    output = model([inputs])[0]["sem_seg"]

    assert torch.equal(tokens.cpu(), vectors["input"]["token_ids"])
    assert output.shape == vectors["output"].shape
    assert torch.allclose(output, vectors["output"], atol=1e-5, rtol=0)


def test_intermediate_text_embeddings_match_release(vectors):
    model = build_tiny_release_model(vectors)
    load_vector_weights(model, vectors)
    model.eval()
    names = json.loads(vectors["config"])["meta_arch_settings"]["test_classes"]

    with torch.no_grad():
        text = model.text_embedder.embed(model.backbone, names)

    assert torch.allclose(text, vectors["intermediate"]["text_feats"][0], atol=1e-5, rtol=0)
