"""Sliding-window accumulation, synonym merging and score resizing."""

import pytest
import torch
import torch.nn.functional as F

from skysense_o.modeling import inference
from skysense_o.modeling.inference import (
    RowResizer,
    bilinear_argmax,
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

    resized = _resize(scores[:, :5, :7], (13, 17))

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


def resized_top(scores, size):
    resized = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    return resized, resized.max(dim=0)


def assert_same_top_class(scores, size, **options):
    labels, values = bilinear_argmax(scores, size, **options)
    resized, (expected_values, expected_labels) = resized_top(scores, size)
    assert labels.shape == size
    assert labels.dtype == torch.int64
    assert torch.allclose(values, expected_values, atol=1e-6)
    # Where the labels differ, the two classes must tie up to float rounding.
    differ = labels != expected_labels
    chosen = resized.gather(0, labels[None])[0]
    assert torch.allclose(chosen[differ], expected_values[differ], atol=1e-6)
    assert int(differ.sum()) <= max(1, labels.numel() // 1000)
    return labels


def smooth_scores(num_classes, side, seed):
    """Spatially smooth probabilities, as a decoder predicts them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, num_classes, 4, 4, generator=generator) * 3
    return F.interpolate(coarse, size=side, mode="bilinear", align_corners=False)[0].sigmoid()


@pytest.mark.parametrize("num_classes, source, size", [
    (1, (8, 8), (20, 30)), (2, (1, 1), (4, 5)), (40, (16, 12), (61, 47)),
    (300, (24, 24), (240, 200)), (30, (20, 18), (7, 5)), (9, (5, 9), (5, 9)),
])
def test_bilinear_argmax_matches_resized_argmax(num_classes, source, size):
    scores = smooth_scores(num_classes, source, seed=num_classes)

    assert_same_top_class(scores, size)


def test_bilinear_argmax_finds_class_that_tops_no_corner():
    # Class 2 is second at every corner, yet first halfway between them: the candidates of a
    # cell must not be limited to the classes that win at its corners.
    scores = torch.zeros(3, 1, 2)
    scores[0, 0] = torch.tensor([1.0, 0.0])
    scores[1, 0] = torch.tensor([0.0, 1.0])
    scores[2, 0] = torch.tensor([0.9, 0.9])

    labels, values = bilinear_argmax(scores, (1, 8), candidates=1)

    resized = F.interpolate(scores[None], size=(1, 8), mode="bilinear", align_corners=False)[0]
    assert labels[0].tolist() == resized.argmax(dim=0)[0].tolist()
    assert labels[0].tolist() == [0, 0, 2, 2, 2, 2, 1, 1]
    assert values[0, 3].item() == pytest.approx(0.9)


def test_bilinear_argmax_breaks_ties_towards_lower_index():
    scores = torch.full((6, 4, 4), 0.25)
    scores[[4, 2]] = 0.75

    labels, _ = bilinear_argmax(scores, (9, 7), candidates=2)

    assert torch.all(labels == 2)


def test_bilinear_argmax_checks_uncertain_pixels_one_by_one(monkeypatch):
    calls = []
    original = inference._argmax_at_pixels
    monkeypatch.setattr(inference, "_argmax_at_pixels",
                        lambda *args: calls.append(len(args[3])) or original(*args))
    scores = smooth_scores(200, (16, 16), seed=3)
    # Overlapping near-ties in one corner make more than one candidate plausible there.
    scores[:20, :3, :3] = 0.99 + 0.001 * torch.rand(20, 3, 3)

    assert_same_top_class(scores, (160, 160), candidates=2)
    assert calls and 0 < calls[0] < 160 * 160


def test_bilinear_argmax_flat_scores_dense_rows(monkeypatch):
    dense_calls = []
    original = inference._argmax_dense_rows
    monkeypatch.setattr(inference, "_argmax_dense_rows",
                        lambda *args: dense_calls.append(len(args[3])) or original(*args))
    # Independent noise per source value: most classes can win in most cells.
    scores = torch.rand(60, 10, 10, generator=torch.Generator().manual_seed(0))

    assert_same_top_class(scores, (50, 40), max_block_elements=5000)
    assert dense_calls


def test_bilinear_argmax_rejects_bad_input():
    with pytest.raises(ValueError, match="T x h x w"):
        bilinear_argmax(torch.rand(5, 5), (3, 3))
    with pytest.raises(ValueError, match="T x h x w"):
        bilinear_argmax(torch.rand(0, 5, 5), (3, 3))
    with pytest.raises(ValueError, match=r"output size \(0, 3\)"):
        bilinear_argmax(torch.rand(2, 5, 5), (0, 3))


def test_bilinear_argmax_compares_constant_classes_exactly():
    # Classes above a decoder's class budget are constant; the probability output writes
    # their value unchanged, and the labels must be its argmax, ties included.
    scores = smooth_scores(6, (8, 8), seed=5)
    scores[1] = 0.5
    scores[4] = 0.5
    scores[5] = 0.2

    labels, values = bilinear_argmax(scores, (30, 30))

    probabilities = _resize(scores, (30, 30))
    top_two = probabilities.topk(2, dim=0).values
    clear = top_two[0] - top_two[1] > 1e-6
    assert torch.allclose(values, top_two[0], atol=1e-6)
    assert torch.equal(labels[clear], probabilities.argmax(dim=0)[clear])
    # Where constant class 1 wins, its value is exact.
    assert torch.all(values[labels == 1] == 0.5)
    assert (labels == 1).any()
    assert not (labels == 4).any()
    assert not (labels == 5).any()


def test_bilinear_argmax_of_constant_classes_only():
    scores = torch.tensor([0.1, 0.7, 0.7]).view(3, 1, 1).expand(3, 4, 5)

    labels, values = bilinear_argmax(scores, (9, 11))

    assert torch.all(labels == 1)
    assert torch.allclose(values, torch.full((9, 11), 0.7))
