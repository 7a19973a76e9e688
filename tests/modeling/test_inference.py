"""Sliding-window accumulation, synonym merging and score resizing."""

import pytest
import torch
import torch.nn.functional as F

from skysense_o.modeling.inference import (
    RowResizer,
    expand_with_synonyms,
    merge_synonym_scores,
    padded_length,
    score_downsample_factor,
    sliding_window_scores,
    window_positions,
    window_weights,
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


@pytest.mark.parametrize("output_size", [(100, 71), (20, 13), (37, 29), (5, 90)])
def test_row_resizer_matches_interpolate(output_size):
    torch.manual_seed(0)
    source = torch.rand(3, 37, 29)
    result = torch.full((3, *output_size), float("nan"))

    def store(row_start, row_end, rows):
        result[:, row_start:row_end] = rows

    resizer = RowResizer((37, 29), output_size, store)
    for start in range(0, 37, 7):
        resizer.push(source[:, start : start + 7])
    expected = F.interpolate(
        source[None], size=output_size, mode="bilinear", align_corners=False
    )[0]
    assert resizer.next_row == output_size[0]
    assert torch.allclose(result, expected, atol=1e-6)


def coarse_predictor(factor):
    """Window scores at 1/``factor`` of the window's side, depending on pixels and position."""

    def predict(crops):
        coarse = F.avg_pool2d(crops, factor)
        ramp = torch.linspace(0, 1, coarse.shape[-1])
        return torch.stack([coarse[:, 0] + ramp, coarse[:, 1] * ramp], dim=1)

    return predict


@pytest.mark.parametrize("height, width, window, stride, factor", [
    (80, 112, 32, 16, 4), (64, 64, 64, 32, 4), (70, 46, 16, 6, 2), (48, 60, 24, 12, 3),
])
def test_coarse_average_is_resized_once(height, width, window, stride, factor):
    # Averaging on the coarse grid and resizing the grid once must equal the reference: the
    # coarse average of every window, bilinearly resized to the image as a whole.
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    predict = coarse_predictor(factor)
    cell = window // factor
    total = torch.zeros(2, height // factor, width // factor)
    count = torch.zeros(1, height // factor, width // factor)
    for top in window_positions(height, window, stride):
        for left in window_positions(width, window, stride):
            crop = image[..., top : top + window, left : left + window]
            rows = slice(top // factor, top // factor + cell)
            columns = slice(left // factor, left // factor + cell)
            total[:, rows, columns] += predict(crop)[0]
            count[:, rows, columns] += 1
    expected = F.interpolate((total / count)[None], size=(height, width), mode="bilinear",
                             align_corners=False)[0]
    blocks = []

    sliding_window_scores(
        image, predict, num_classes=2, window=window, stride=stride, batch_size=2,
        emit_rows=lambda start, stop, rows: blocks.append((start, stop, rows.clone())),
        emit_block_rows=8, score_downsample=factor,
    )

    assert [start for start, _, _ in blocks] == [0] + [stop for _, stop, _ in blocks[:-1]]
    assert blocks[-1][1] == height
    assert all(stop - start <= 8 + factor for start, stop, _ in blocks)
    streamed = torch.cat([rows for _, _, rows in blocks], dim=1)
    assert streamed.shape == (2, height, width)
    assert torch.allclose(streamed, expected, atol=1e-5)


def test_score_downsample_factor_and_padding():
    # The decoder predicts 64 x 64 per window: a 384 window can average on a 4-pixel grid
    # (6 does not divide the stride 256), a 256 window with stride 192 on a 4-pixel grid.
    assert score_downsample_factor(384, 256, 64) == 4
    assert score_downsample_factor(256, 192, 64) == 4
    assert score_downsample_factor(256, 200, 64) == 4
    assert score_downsample_factor(256, 190, 64) == 2
    assert score_downsample_factor(255, 190, 64) == 1
    # A decoder as fine as the window leaves nothing to save.
    assert score_downsample_factor(64, 48, 64) == 1
    assert score_downsample_factor(64, 48, 128) == 1
    with pytest.raises(ValueError, match="invalid score side"):
        score_downsample_factor(64, 48, 0)
    assert padded_length(100, 64, 4) == 100
    assert padded_length(101, 64, 4) == 104
    assert padded_length(30, 64, 4) == 64
    assert padded_length(101, 64, 1) == 101


def test_sliding_window_rejects_bad_geometry():
    image = torch.zeros(1, 3, 70, 64)
    emit = lambda *args: None  # noqa: E731
    with pytest.raises(ValueError, match="divisor of the window"):
        sliding_window_scores(image, coarse_predictor(3), num_classes=2, window=32, stride=16,
                              batch_size=1, emit_rows=emit, score_downsample=3)
    with pytest.raises(ValueError, match="pad it to padded_length"):
        sliding_window_scores(image, coarse_predictor(4), num_classes=2, window=32, stride=16,
                              batch_size=1, emit_rows=emit, score_downsample=4)
    with pytest.raises(ValueError, match=r"expected \(8, 8\)"):
        sliding_window_scores(torch.zeros(1, 3, 64, 64), coarse_predictor(2), num_classes=2,
                              window=32, stride=16, batch_size=1, emit_rows=emit,
                              score_downsample=4)


def test_window_weights_shapes_and_values():
    uniform = window_weights(4, "uniform")
    assert torch.equal(uniform, torch.ones(1, 4, 4))
    tent = window_weights(4, "tent")
    # 1 - |2 (i + 0.5) / 4 - 1| for i = 0..3 is 0.25, 0.75, 0.75, 0.25.
    profile = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(tent[0], profile[:, None] * profile[None, :])
    with pytest.raises(ValueError, match="invalid window blend 'gauss'"):
        window_weights(4, "gauss")


def test_tent_blend_is_weighted_average():
    # Two windows of 8 on a 1 x 12 strip (rows of 8): the tent-weighted average of two
    # constant predictions equals the hand-computed weighted mean on every column.
    image = torch.zeros(1, 1, 8, 12)
    values = iter([1.0, 3.0])

    def predict(crops):
        return torch.full((crops.shape[0], 1, 8, 8), next(values))

    rows = []
    sliding_window_scores(image, predict, num_classes=1, window=8, stride=4, batch_size=1,
                          emit_rows=lambda start, stop, block: rows.append(block.clone()),
                          blend="tent")
    result = torch.cat(rows, dim=1)[0, 0]
    weight = window_weights(8, "tent")[0, 0]
    left = torch.cat([weight, torch.zeros(4)])
    right = torch.cat([torch.zeros(4), weight])
    expected = (1.0 * left + 3.0 * right) / (left + right)
    assert torch.allclose(result, expected, atol=1e-6)
