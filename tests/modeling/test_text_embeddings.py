"""Tests of TextEmbedder on the SkySense-Tiny backbone (random weights, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from skysense_o import add_skysense_o_config
from skysense_o.modeling import TextEmbedder, build_vl_backbone

TEMPLATES = ["A remote sensing image of a {}.", "an aerial photo of the {}", "{}"]
CLASSES = ["building", "road", "tree", "water", "bare soil"]
EMBED_DIM = 256


def make_cfg():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    # The image tower is not used here, so it is kept at its smallest grid.
    cfg.MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE = 32
    cfg.MODEL.SKYSENSE_O.TEXT.TEMPLATES = list(TEMPLATES)
    return cfg


def make_backbone(text_finetune: str = "frozen"):
    torch.manual_seed(0)
    cfg = make_cfg()
    cfg.MODEL.SKYSENSE_O.BACKBONE.TEXT_FINETUNE = text_finetune
    return build_vl_backbone(cfg).eval()


@pytest.fixture(scope="module")
def frozen_backbone():
    return make_backbone("frozen")


@pytest.fixture
def batch_sizes(frozen_backbone, monkeypatch):
    """The number of prompts of every text-tower forward of ``frozen_backbone``, in order."""
    sizes = []
    encode_text = frozen_backbone.encode_text

    def recording_encode_text(token_ids):
        sizes.append(token_ids.shape[0])
        return encode_text(token_ids)

    monkeypatch.setattr(frozen_backbone, "encode_text", recording_encode_text)
    return sizes


def reference_embeddings(backbone, class_names, templates):
    """T x P x E normalised per-prompt embeddings, encoded one prompt at a time."""
    with torch.no_grad():
        rows = []
        for name in class_names:
            prompts = [template.replace("{}", name) for template in templates]
            rows.append(F.normalize(backbone.encode_text(backbone.tokenize(prompts)), dim=-1))
    return torch.stack(rows)


# ---- Values and shapes ------------------------------------------------------------------------


def test_mean_ensemble_shape_and_values(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES, ensemble="mean")
    embeddings = embedder.embed(frozen_backbone, CLASSES)
    assert embeddings.shape == (len(CLASSES), 1, EMBED_DIM)
    assert embedder.num_prompt_channels == 1
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(CLASSES), 1))
    expected = F.normalize(
        reference_embeddings(frozen_backbone, CLASSES, TEMPLATES).mean(dim=1, keepdim=True),
        dim=-1,
    )
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)


def test_channels_ensemble_shape_and_values(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES, ensemble="channels")
    embeddings = embedder.embed(frozen_backbone, CLASSES)
    assert embeddings.shape == (len(CLASSES), len(TEMPLATES), EMBED_DIM)
    assert embedder.num_prompt_channels == len(TEMPLATES)
    torch.testing.assert_close(
        embeddings.norm(dim=-1), torch.ones(len(CLASSES), len(TEMPLATES))
    )
    expected = reference_embeddings(frozen_backbone, CLASSES, TEMPLATES)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    # The channels differ, so the templates were not all encoded as the same prompt.
    assert not torch.allclose(embeddings[:, 0], embeddings[:, 1])


def test_built_from_cfg(frozen_backbone):
    cfg = make_cfg()
    cfg.MODEL.SKYSENSE_O.TEXT.ENSEMBLE = "channels"
    cfg.MODEL.SKYSENSE_O.TEXT.CHUNK_SIZE = 4
    cfg.MODEL.SKYSENSE_O.TEXT.CACHE_ENTRIES = 3
    embedder = TextEmbedder(cfg)
    assert embedder.templates == tuple(TEMPLATES)
    assert embedder.ensemble == "channels"
    assert embedder.chunk_size == 4
    assert embedder.cache_info().max_entries == 3
    assert embedder.embed(frozen_backbone, ["road"]).shape == (1, 3, EMBED_DIM)


def test_chunked_equals_unchunked(frozen_backbone, batch_sizes):
    chunked = TextEmbedder(templates=TEMPLATES, ensemble="channels", chunk_size=4)
    whole = TextEmbedder(templates=TEMPLATES, ensemble="channels", chunk_size=1000)
    chunked_embeddings = chunked.embed(frozen_backbone, CLASSES)
    assert batch_sizes == [4, 4, 4, 3]
    whole_embeddings = whole.embed(frozen_backbone, CLASSES)
    assert batch_sizes[-1] == len(CLASSES) * len(TEMPLATES)
    torch.testing.assert_close(chunked_embeddings, whole_embeddings, atol=1e-5, rtol=1e-5)


def test_large_vocabulary_is_chunked(frozen_backbone, batch_sizes):
    names = [f"class {index}" for index in range(300)]
    embedder = TextEmbedder(templates=["{}"], chunk_size=128)
    embeddings = embedder.embed(frozen_backbone, names)
    assert embeddings.shape == (300, 1, EMBED_DIM)
    assert len(batch_sizes) == math.ceil(300 / 128)
    assert max(batch_sizes) == 128


# ---- Cache ------------------------------------------------------------------------------------


def test_cache_hit_on_repeat(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES)
    first = embedder.embed(frozen_backbone, CLASSES)
    assert embedder.cache_info()[:3] == (0, 1, 1)
    second = embedder.embed(frozen_backbone, list(CLASSES))
    assert embedder.cache_info()[:3] == (1, 1, 1)
    torch.testing.assert_close(first, second)


def test_cache_returns_independent_copies(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES)
    first = embedder.embed(frozen_backbone, CLASSES)
    expected = first.clone()
    first.zero_()
    torch.testing.assert_close(embedder.embed(frozen_backbone, CLASSES), expected)


def test_cache_miss_on_other_classes_or_templates(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES)
    embedder.embed(frozen_backbone, CLASSES)
    embedder.embed(frozen_backbone, CLASSES[:-1])
    assert embedder.cache_info().misses == 2
    embedder.embed(frozen_backbone, list(reversed(CLASSES)))
    assert embedder.cache_info().misses == 3
    other = embedder.embed(frozen_backbone, CLASSES, templates=["a satellite image of {}"])
    assert embedder.cache_info().misses == 4
    assert embedder.cache_info().hits == 0
    expected = reference_embeddings(frozen_backbone, CLASSES, ["a satellite image of {}"])
    torch.testing.assert_close(other, expected, atol=1e-5, rtol=1e-5)
    embedder.embed(frozen_backbone, CLASSES, templates=["a satellite image of {}"])
    assert embedder.cache_info().hits == 1


def test_cache_invalidated_by_load_state_dict():
    backbone = make_backbone()
    embedder = TextEmbedder(templates=TEMPLATES)
    before = embedder.embed(backbone, CLASSES)

    # New text weights: the token embedding of another random initialisation.
    state = backbone.model.state_dict()
    state["token_embedding.weight"] = torch.randn_like(state["token_embedding.weight"])
    backbone.model.load_state_dict(state)
    after = embedder.embed(backbone, CLASSES)
    assert embedder.cache_info()[:2] == (0, 2)
    assert not torch.allclose(before, after)
    fresh = TextEmbedder(templates=TEMPLATES).embed(backbone, CLASSES)
    torch.testing.assert_close(after, fresh)


def test_cache_invalidated_by_optimizer_step():
    backbone = make_backbone(text_finetune="full")
    embedder = TextEmbedder(templates=TEMPLATES)
    with torch.no_grad():
        before = embedder.embed(backbone, CLASSES)
        embedder.embed(backbone, CLASSES)
    assert embedder.cache_info()[:2] == (1, 1)

    optimizer = torch.optim.AdamW(backbone.text_parameters(), lr=1e-2)
    loss = embedder.embed(backbone, CLASSES)[:, 0, 0].sum()
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        after = embedder.embed(backbone, CLASSES)
    assert embedder.cache_info()[:2] == (1, 2)
    assert not torch.allclose(before, after)


def test_cache_key_includes_dtype():
    backbone = make_backbone()
    embedder = TextEmbedder(templates=TEMPLATES)
    embedder.embed(backbone, CLASSES)
    backbone.double()
    embeddings = embedder.embed(backbone, CLASSES)
    assert embeddings.dtype == torch.float64
    assert embedder.cache_info()[:2] == (0, 2)


def test_cache_evicts_least_recently_used(frozen_backbone):
    embedder = TextEmbedder(templates=["{}"], cache_entries=2)
    embedder.embed(frozen_backbone, ["a"])
    embedder.embed(frozen_backbone, ["b"])
    embedder.embed(frozen_backbone, ["a"])  # hit; "b" is now the oldest
    embedder.embed(frozen_backbone, ["c"])  # evicts "b"
    assert embedder.cache_info() == (1, 3, 2, 2)
    embedder.embed(frozen_backbone, ["a"])
    assert embedder.cache_info().hits == 2
    embedder.embed(frozen_backbone, ["b"])
    assert embedder.cache_info().misses == 4


def test_cache_disabled_with_zero_entries(frozen_backbone):
    embedder = TextEmbedder(templates=["{}"], cache_entries=0)
    first = embedder.embed(frozen_backbone, ["a"])
    second = embedder.embed(frozen_backbone, ["a"])
    assert embedder.cache_info() == (0, 0, 0, 0)
    torch.testing.assert_close(first, second)


def test_clear_cache(frozen_backbone):
    embedder = TextEmbedder(templates=["{}"])
    embedder.embed(frozen_backbone, ["a"])
    embedder.clear_cache()
    embedder.embed(frozen_backbone, ["a"])
    assert embedder.cache_info()[:3] == (0, 2, 1)


def test_training_mode_has_gradients_and_no_cache():
    backbone = make_backbone(text_finetune="attention").train()
    embedder = TextEmbedder(templates=TEMPLATES)
    for _ in range(2):
        embeddings = embedder.embed(backbone, CLASSES)
        assert embeddings.requires_grad
    assert embedder.cache_info() == (0, 0, 0, 8)

    embeddings.sum().backward()
    with_grad = {
        name for name, p in backbone.model.named_parameters() if p.grad is not None
    }
    assert "transformer.resblocks.0.attn.in_proj_weight" in with_grad
    assert "positional_embedding" in with_grad
    assert "token_embedding.weight" not in with_grad

    # Under no_grad the same backbone uses the cache.
    with torch.no_grad():
        embedder.embed(backbone, CLASSES)
        embedder.embed(backbone, CLASSES)
    assert embedder.cache_info()[:2] == (1, 1)


# ---- Invalid input ----------------------------------------------------------------------------


def test_empty_class_list_rejected(frozen_backbone):
    with pytest.raises(ValueError, match="empty"):
        TextEmbedder(templates=TEMPLATES).embed(frozen_backbone, [])


def test_class_names_must_be_strings(frozen_backbone):
    embedder = TextEmbedder(templates=TEMPLATES)
    with pytest.raises(TypeError, match="'road'"):
        embedder.embed(frozen_backbone, "road")
    with pytest.raises(TypeError, match="7"):
        embedder.embed(frozen_backbone, ["road", 7])


@pytest.mark.parametrize("template", ["a photo of a road", "a {} next to a {}"])
def test_template_needs_one_placeholder(template):
    with pytest.raises(ValueError, match=template.replace("{}", r"\{\}")):
        TextEmbedder(templates=["{}", template])


def test_template_override_is_checked(frozen_backbone):
    with pytest.raises(ValueError, match="no placeholder"):
        TextEmbedder(templates=TEMPLATES).embed(
            frozen_backbone, CLASSES, templates=["no placeholder"]
        )


def test_templates_must_be_a_list():
    with pytest.raises(ValueError, match="non-empty"):
        TextEmbedder(templates=[])
    with pytest.raises(ValueError, match="non-empty"):
        TextEmbedder(templates="a {}")


@pytest.mark.parametrize(
    "keys, fragment",
    [
        ({"ensemble": "max"}, "'max'"),
        ({"chunk_size": 0}, "CHUNK_SIZE"),
        ({"cache_entries": -1}, "CACHE_ENTRIES"),
        ({"chunk_size": 2.5}, "2.5"),
    ],
)
def test_invalid_settings_rejected(keys, fragment):
    with pytest.raises(ValueError, match=fragment):
        TextEmbedder(templates=TEMPLATES, **keys)
