"""The SkySenseO meta-architecture end to end, on small models and a real sample image."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from PIL import Image

from skysense_o import add_skysense_o_config

# A very small configuration of the quick-start model, so that each test runs in seconds.
SMALL = [
    "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE", 64,
    "MODEL.SKYSENSE_O.BACKBONE.GUIDANCE_LAYERS", [1, 3],
    "MODEL.SKYSENSE_O.DECODER.WINDOW_SIZE", 2,
    "MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET", 8,
    "MODEL.SKYSENSE_O.INFERENCE.WINDOW", 64,
    "MODEL.SKYSENSE_O.INFERENCE.STRIDE", 48,
    "INPUT.SIZE_DIVISIBILITY", 32,
]


def make_cfg(*overrides):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file("configs/quickstart.yaml")
    cfg.merge_from_list(list(SMALL) + list(overrides))
    return cfg


def build(*overrides):
    torch.manual_seed(0)
    return build_model(make_cfg(*overrides))


def random_image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("decoder", ["CostAggregationDecoder", "SAMMaskDecoder"])
def test_inference_shapes_batch_of_odd_sizes(decoder):
    model = build("MODEL.SKYSENSE_O.DECODER.NAME", decoder).eval()
    sizes = [(70, 95), (64, 64), (33, 120)]
    texts = [["building", "road"], ["water", "tree", "road"], ["car"]]
    inputs = [{"image": random_image(h, w, i), "height": h, "width": w, "texts": t}
              for i, ((h, w), t) in enumerate(zip(sizes, texts))]

    outputs = model(inputs)

    assert len(outputs) == 3
    for (height, width), names, output in zip(sizes, texts, outputs):
        scores = output["sem_seg"]
        assert scores.shape == (len(names), height, width)
        assert float(scores.min()) >= 0.0
        assert float(scores.max()) <= 1.0


def test_inference_single_image_matches_batch():
    model = build().eval()
    first = {"image": random_image(70, 95), "height": 35, "width": 40, "texts": ["a", "b"]}
    second = {"image": random_image(64, 64, 1), "height": 64, "width": 64, "texts": ["c"]}

    alone = model([first])[0]["sem_seg"]
    batched = model([first, second])[0]["sem_seg"]

    assert alone.shape == (2, 35, 40)
    assert torch.allclose(alone, batched, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_training_returns_three_finite_losses(batch_size):
    model = build("MODEL.SKYSENSE_O.LOSS.REGION_CONTRAST_WEIGHT", 0.4,
                  "MODEL.SKYSENSE_O.LOSS.REGULAR_WEIGHT", 0.4).train()
    texts = [["building", "road", "tree"], ["water", "road"], ["car", "tree", "road", "grass"]]
    inputs = [
        {"image": random_image(64, 64, i),
         "sem_seg": torch.randint(0, len(texts[i]), (64, 64)),
         "texts": texts[i]}
        for i in range(batch_size)
    ]

    losses = model(inputs)

    assert set(losses) == {"loss_sem_seg", "loss_region_contrast", "loss_regularization"}
    for value in losses.values():
        assert torch.isfinite(value)
    assert losses["loss_sem_seg"] > 0
    assert losses["loss_region_contrast"] > 0


def test_training_gradients_follow_finetune_mode():
    model = build("MODEL.SKYSENSE_O.BACKBONE.VISUAL_FINETUNE", "frozen",
                  "MODEL.SKYSENSE_O.BACKBONE.TEXT_FINETUNE", "attention").train()
    inputs = [{"image": random_image(64, 64), "sem_seg": torch.randint(0, 2, (64, 64)),
               "texts": ["building", "road"]}]

    sum(model(inputs).values()).backward()

    visual = [p for n, p in model.named_parameters() if ".model.visual." in n]
    assert visual and all(p.grad is None for p in visual)
    decoder = [p for n, p in model.named_parameters() if n.startswith("sem_seg_head.transformer.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder)
    text_trainable = [n for n, p in model.named_parameters()
                      if ".model.transformer." in n and p.requires_grad]
    assert text_trainable and all("attn" in n for n in text_trainable)


def test_sliding_equals_whole_when_one_window_covers_image():
    whole = build().eval()
    sliding = build("MODEL.SKYSENSE_O.INFERENCE.MODE", "sliding").eval()
    sliding.load_state_dict(whole.state_dict())
    inputs = [{"image": random_image(64, 64), "height": 64, "width": 64,
               "texts": ["building", "road", "water"]}]

    expected = whole(inputs)[0]["sem_seg"]
    actual = sliding(inputs)[0]["sem_seg"]

    assert torch.allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize("decoder", ["CostAggregationDecoder", "SAMMaskDecoder"])
def test_score_side_is_decoder_output_side(decoder):
    # The sliding window sizes its coarse score grid from score_side, so it must be the side
    # that the decoder really predicts.
    model = build("MODEL.SKYSENSE_O.DECODER.NAME", decoder).eval()
    with torch.no_grad():
        embeds = model.text_embedder.embed(model.backbone, ["building", "road"])
        side = model.image_size
        probs = model.predict_window_scores(torch.zeros(1, 3, side, side), embeds)
    assert probs.shape == (1, 2, model.score_side, model.score_side)


def test_sliding_window_covers_large_image():
    model = build("MODEL.SKYSENSE_O.INFERENCE.MODE", "sliding").eval()
    inputs = [{"image": random_image(150, 200), "height": 150, "width": 200,
               "texts": ["building", "road"]}]

    scores = model(inputs)[0]["sem_seg"]

    assert scores.shape == (2, 150, 200)
    assert torch.isfinite(scores).all()


def test_global_view_and_keep_aspect_ratio_shapes():
    model = build("MODEL.SKYSENSE_O.INFERENCE.MODE", "sliding",
                  "MODEL.SKYSENSE_O.INFERENCE.GLOBAL_WEIGHT", 0.3,
                  "MODEL.SKYSENSE_O.INFERENCE.KEEP_ASPECT_RATIO", True).eval()
    inputs = [{"image": random_image(90, 130), "height": 45, "width": 65, "texts": ["a", "b"]}]

    scores = model(inputs)[0]["sem_seg"]

    assert scores.shape == (2, 45, 65)


@pytest.mark.parametrize("mode, overrides, image_size, output_size", [
    ("whole", [], (70, 95), (70, 95)),
    ("whole", ["MODEL.SKYSENSE_O.INFERENCE.KEEP_ASPECT_RATIO", True], (90, 130), (45, 65)),
    ("sliding", [], (150, 200), (150, 200)),
    ("sliding", ["MODEL.SKYSENSE_O.INFERENCE.GLOBAL_WEIGHT", 0.3], (90, 130), (100, 117)),
])
def test_label_output_is_argmax_of_probabilities(mode, overrides, image_size, output_size):
    settings = ["MODEL.SKYSENSE_O.INFERENCE.MODE", mode, *overrides]
    probabilities = build(*settings).eval()
    labels = build(*settings, "MODEL.SKYSENSE_O.INFERENCE.OUTPUT", "labels").eval()
    texts = ["building", "road", "water", "tree", "car", "field"]
    inputs = [{"image": random_image(*image_size), "height": output_size[0],
               "width": output_size[1], "texts": texts}]

    scores = probabilities(inputs)[0]["sem_seg"]
    predicted = labels(inputs)[0]["sem_seg"]

    assert predicted.shape == output_size
    assert predicted.dtype == torch.int64
    best = scores.max(dim=0).values
    chosen = scores.gather(0, predicted[None])[0]
    # Identical except where two classes tie up to float rounding.
    assert torch.allclose(chosen, best, atol=1e-6)
    assert float((predicted == scores.argmax(dim=0)).float().mean()) > 0.999


def test_invalid_output_kind_is_rejected():
    with pytest.raises(ValueError, match="INFERENCE.OUTPUT='argmax'"):
        build("MODEL.SKYSENSE_O.INFERENCE.OUTPUT", "argmax")


def test_retrieval_augmentation_takes_max_over_synonyms():
    model = build("MODEL.SKYSENSE_O.INFERENCE.RETRIEVAL_AUGMENTATION", True).eval()
    image = random_image(64, 64)
    inputs = {"image": image, "height": 64, "width": 64, "texts": ["building", "water"],
              "synonyms": [["house", "roof"], []]}
    names = ["building", "water", "house", "roof"]
    with torch.no_grad():
        embeds = model.text_embedder.embed(model.backbone, names)
        normalized = model.normalize(image)[None]
        separate = model.predict_window_scores(normalized, embeds)[0]
        merged = model.predict_window_scores(normalized, embeds, [[2, 3], []])[0]

    output = model([inputs])[0]["sem_seg"]

    assert output.shape == (2, 64, 64)
    assert merged.shape == (2, *separate.shape[-2:])
    assert torch.equal(merged[0], separate[[0, 2, 3]].amax(dim=0))
    assert torch.equal(merged[1], separate[1])


def test_bfloat16_autocast_inference_runs():
    model = build("MODEL.SKYSENSE_O.INFERENCE.AMP_DTYPE", "bfloat16").eval()
    inputs = [{"image": random_image(64, 64), "height": 64, "width": 64, "texts": ["a", "b"]}]

    scores = model(inputs)[0]["sem_seg"]

    assert scores.shape == (2, 64, 64)
    assert torch.isfinite(scores).all()


def test_invalid_inference_mode_is_rejected():
    with pytest.raises(ValueError, match="INFERENCE.MODE='tiles'"):
        build("MODEL.SKYSENSE_O.INFERENCE.MODE", "tiles")


def test_training_inputs_without_texts_are_rejected():
    model = build().train()

    with pytest.raises(KeyError, match="skysa_semantic"):
        model([{"image": random_image(64, 64), "sem_seg": torch.zeros(64, 64, dtype=torch.long)}])


@pytest.mark.parametrize("decoder", ["CostAggregationDecoder", "SAMMaskDecoder"])
def test_decoders_train_on_real_image(samples_dir, decoder):
    """A few optimisation steps on a real labelled crop reduce the training loss."""
    dataset = samples_dir / "dubai_aerial"
    classes = ["building", "land (unpaved area)", "road", "vegetation", "water"]
    image = np.asarray(Image.open(dataset / "images" / "dubai_t1_009.jpg").convert("RGB"))
    label = np.asarray(Image.open(dataset / "labels" / "dubai_t1_009.png"))
    crop_image = torch.from_numpy(image[200:264, 300:364].copy()).permute(2, 0, 1)
    crop_label = torch.from_numpy(label[200:264, 300:364].astype(np.int64))
    model = build("MODEL.SKYSENSE_O.DECODER.NAME", decoder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    inputs = [{"image": crop_image, "sem_seg": crop_label, "texts": classes}]

    history = []
    for _ in range(12):
        loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())

    assert history[-1] < 0.8 * history[0]
