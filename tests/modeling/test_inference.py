"""Sliding-window accumulation, synonym merging and score resizing."""

import pytest
import torch
import torch.nn.functional as F

from skysense_o.modeling.inference import (
    expand_with_synonyms,
    merge_synonym_scores,
    sliding_window_scores,
    window_positions,
)
from skysense_o.modeling.meta_arch import _resize


def window_predictor(crops: torch.Tensor) -> torch.Tensor:
    """Scores that depend on the pixels and on the position inside the window."""
    ramp = torch.linspace(0, 1, crops.shape[-1])
    return torch.stack([crops[:, 0] + ramp, crops[:, 1] * ramp, crops[:, 2] - ramp], dim=1)


def reference_average(image, window, stride):
    height, width = image.shape[-2:]
    total = torch.zeros(3, height, width)
    count = torch.zeros(1, height, width)
    for top in window_positions(height, window, stride):
        for left in window_positions(width, window, stride):
            crop = image[..., top : top + window, left : left + window]
            total[:, top : top + window, left : left + window] += window_predictor(crop)[0]
            count[:, top : top + window, left : left + window] += 1
    return total / count


@pytest.mark.parametrize("height, width, window, stride", [
    (50, 70, 16, 12), (16, 16, 16, 8), (100, 40, 20, 5), (33, 47, 10, 10),
])
def test_streamed_average_equals_full_canvas(height, width, window, stride):
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    blocks = []

    sliding_window_scores(
        image, window_predictor, num_classes=3, window=window, stride=stride, batch_size=3,
        emit_rows=lambda start, stop, rows: blocks.append((start, stop, rows.clone())),
        emit_block_rows=7,
    )

    assert [start for start, _, _ in blocks] == [0] + [stop for _, stop, _ in blocks[:-1]]
    assert blocks[-1][1] == height
    assert all(stop - start <= 7 for start, stop, _ in blocks)
    streamed = torch.cat([rows for _, _, rows in blocks], dim=1)
    assert torch.allclose(streamed, reference_average(image, window, stride), atol=1e-6)


def test_window_positions_cover_axis_and_reject_gaps():
    assert window_positions(10, 4, 3) == [0, 3, 6]
    assert window_positions(11, 4, 3) == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="larger than the window"):
        window_positions(10, 4, 5)
    with pytest.raises(ValueError, match="shorter than the window"):
        window_positions(3, 4, 2)


def test_resize_fills_constant_channels_exactly():
    scores = torch.rand(4, 6, 8, generator=torch.Generator().manual_seed(1))
    scores[1] = 0.25
    scores[3] = torch.sigmoid(torch.tensor(-100.0))

    resized = _resize(scores, (13, 17), crop=(5, 7))

    expected = F.interpolate(scores[None, :, :5, :7], size=(13, 17), mode="bilinear",
                             align_corners=False)[0]
    assert resized.shape == (4, 13, 17)
    assert torch.equal(resized[[0, 2]], expected[[0, 2]])
    assert torch.all(resized[1] == 0.25)
    assert torch.all(resized[3] == scores[3, 0, 0])


def test_synonyms_expand_and_merge():
    names, groups = expand_with_synonyms(["building", "water"], [["house"], []])
    scores = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)

    merged = merge_synonym_scores(scores, groups)

    assert names == ["building", "water", "house"]
    assert groups == [[2], []]
    assert merged.flatten().tolist() == pytest.approx([0.9, 0.5])


def test_synonym_lists_must_match_classes():
    with pytest.raises(ValueError, match="2 synonym lists were given for 1 classes"):
        expand_with_synonyms(["building"], [["house"], ["roof"]])
