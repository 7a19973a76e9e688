"""Losses against hand-computed values and against the released implementation's outputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from skysense_o.modeling.losses import (
    SkySenseOCriterion,
    graph_weight_matrix,
    pixel_bce_loss,
    region_contrast_loss,
    region_features_pixel_shuffle,
    region_features_pooled,
    region_text_similarity,
    regularization_loss,
)


def _bce(logit: float, target: float) -> float:
    return -(target * math.log(1 / (1 + math.exp(-logit)))
             + (1 - target) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_pixel_bce_excludes_ignored_pixels():
    logits = torch.tensor([[[2.0, -1.0]], [[0.5, 3.0]]])  # 2 classes x 1 x 2 pixels
    targets = torch.tensor([[0, 255]])

    loss = pixel_bce_loss(logits, targets, 255)

    expected = (_bce(2.0, 1) + _bce(0.5, 0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_pixel_bce_can_count_ignored_as_negative():
    logits = torch.tensor([[[2.0, -1.0]], [[0.5, 3.0]]])
    targets = torch.tensor([[0, 255]])

    loss = pixel_bce_loss(logits, targets, 255, ignore_as_negative=True)

    expected = (_bce(2.0, 1) + _bce(0.5, 0) + _bce(-1.0, 0) + _bce(3.0, 0)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_pixel_bce_all_ignored_is_zero_with_gradient():
    logits = torch.zeros(3, 2, 2, requires_grad=True)

    loss = pixel_bce_loss(logits, torch.full((2, 2), 255), 255)
    loss.backward()

    assert loss.item() == 0.0
    assert logits.grad is not None


def test_pixel_bce_rejects_label_outside_names():
    with pytest.raises(ValueError, match="label value 3"):
        pixel_bce_loss(torch.zeros(2, 1, 2), torch.tensor([[0, 3]]), 255)


def test_region_features_are_coverage_weighted_means():
    embedding = torch.tensor([[[1.0, 3.0]], [[0.0, 4.0]]])  # E=2 x h=1 x w=2
    # A 2 x 4 label: class 0 covers the left cell, class 1 half of the right cell.
    targets = torch.tensor([[0, 0, 1, 255], [0, 0, 1, 255]])

    features = region_features_pooled(embedding, targets, num_classes=3, ignore_value=255)

    assert torch.allclose(features[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(features[1], torch.tensor([0.6, 0.8]))
    assert torch.equal(features[2], torch.zeros(2))


def test_region_contrast_on_hand_case():
    similarity = torch.tensor([[1.0, 0.0], [0.25, 0.5]])
    present = torch.tensor([True, False])

    loss = region_contrast_loss(similarity, present)

    expected = (_bce(1.0, 1) + _bce(0.0, 0) + _bce(0.25, 0) + _bce(0.5, 0)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_region_text_similarity_is_min_max_normalised():
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])

    similarity = region_text_similarity(regions, texts)

    inv = 1 / math.sqrt(2)
    raw = torch.tensor([[1.0, inv], [0.0, inv]])
    assert torch.allclose(similarity, raw / 1.0)


def test_regularization_uses_off_diagonal_and_graph_weights():
    similarity = torch.tensor([[0.9, 0.5], [0.2, 0.7]])
    names = torch.tensor([[1.0, 0.4], [0.4, 1.0]])
    graph = graph_weight_matrix(["a", "b"], lambda s, t: {("a", "b"): 3}.get((s, t)))

    plain = regularization_loss(similarity, names)
    weighted = regularization_loss(similarity, names, graph)

    assert graph.tolist() == [[0.0, 8.0], [0.0, 0.0]]
    assert plain.item() == pytest.approx((0.5 * 0.4 + 0.2 * 0.4) / 2)
    assert weighted.item() == pytest.approx((0.5 * 0.4 * 8) / 2)


def test_criterion_counts_crops_without_two_classes():
    criterion = SkySenseOCriterion(pixel_weight=1.0, region_contrast_weight=0.4,
                                   regular_weight=0.4, contrast_scale=1.0, ignore_value=255)
    logits = torch.zeros(2, 4, 4, requires_grad=True)
    target = torch.zeros(4, 4, dtype=torch.long)

    two_classes = torch.tensor([[0, 0, 1, 1]] * 4)

    losses = criterion([logits, logits], [target, two_classes],
                       [torch.zeros(2, 3), torch.eye(2, 3)], [torch.zeros(2, 3), torch.eye(2, 3)],
                       [torch.eye(2), torch.eye(2)], [None, None])

    # The two-class crop gives a positive contrast term, so the mean over both crops is too.
    assert losses["loss_region_contrast"].item() > 0.0
    assert criterion.auxiliary_crops == 2
    assert criterion.skipped_auxiliary == 1

    alone = criterion([logits], [target], [torch.zeros(2, 3)], [torch.zeros(2, 3)],
                      [torch.eye(2)], [None])

    assert alone["loss_region_contrast"].item() == 0.0
    assert alone["loss_regularization"].item() == 0.0
    assert (criterion.auxiliary_crops, criterion.skipped_auxiliary) == (3, 2)


def test_criterion_counts_nothing_when_auxiliary_losses_are_off():
    criterion = SkySenseOCriterion(pixel_weight=1.0, region_contrast_weight=0.0,
                                   regular_weight=0.0, contrast_scale=1.0, ignore_value=255)
    logits = torch.zeros(2, 4, 4, requires_grad=True)

    losses = criterion([logits], [torch.zeros(4, 4, dtype=torch.long)], [None],
                       [torch.zeros(2, 3)], [None], [None])

    assert losses["loss_region_contrast"].item() == 0.0
    assert (criterion.auxiliary_crops, criterion.skipped_auxiliary) == (0, 0)


@pytest.mark.parametrize("case_name", ["A_graph_dynamic", "B_plain", "C_shipped_config"])
def test_losses_match_release_vectors(refspec_dir, case_name):
    vectors = torch.load(refspec_dir / "vectors" / "losses_tiny.pt", weights_only=True)
    config = json.loads(vectors["config"])
    case = vectors["cases"][case_name]
    order = json.loads(case["text_order"])
    weights = json.loads(case["weights"])
    logits = F.interpolate(case["logits"], size=(384, 384), mode="bilinear", align_corners=False)
    targets = case["targets"].long()
    embed_dim = vectors["image_feats"].shape[1]
    conv0 = torch.nn.Conv2d(embed_dim, embed_dim * 256, 1)
    conv0.load_state_dict(case["pixel_shuffle_conv0"])
    conv1 = torch.nn.Conv2d(embed_dim, embed_dim, 1)
    conv1.load_state_dict(case["pixel_shuffle_conv1"])
    text = torch.stack([vectors["text_embeds"][name] for name in order])
    sentence = F.normalize(torch.stack([vectors["minilm"][name] for name in order]).float(), dim=-1)
    graph = config["graph_with_score"]
    graph_weights = None
    if case["dynamic_sampler"]:
        graph_weights = graph_weight_matrix(order, lambda a, b: graph.get(a, {}).get(b))
    criterion = SkySenseOCriterion(
        pixel_weight=weights["pixel"], region_contrast_weight=weights["region_contrast"],
        regular_weight=weights["regular"], contrast_scale=1.0, ignore_value=255,
        ignore_as_negative=True,
    )

    with torch.no_grad():
        regions = region_features_pixel_shuffle(vectors["image_feats"][0], targets, len(order),
                                                255, conv0, conv1, 16)
        losses = criterion([logits[0]], [targets], [regions], [text],
                           [sentence @ sentence.T], [graph_weights])

    expected = case["losses"]
    assert losses["loss_sem_seg"].item() == pytest.approx(expected["loss_sem_seg"].item(), abs=1e-5)
    assert losses["loss_region_contrast"].item() == pytest.approx(
        expected["region_contrast_loss"].item(), abs=1e-5)
    assert losses["loss_regularization"].item() == pytest.approx(
        expected["regularization_loss"].item(), abs=1e-5)
