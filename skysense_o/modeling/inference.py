"""Inference helpers: sliding windows with bounded memory, row-wise resizing and retrieval
augmentation."""

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# Receives the class scores of rows [row_start, row_end) of the image: T x rows x W.
RowsCallback = Callable[[int, int, torch.Tensor], None]
# Maps N x C x window x window crops to N x T x s x s class scores, where s is the window side
# divided by the sliding window's score downsampling factor.
WindowPredictor = Callable[[torch.Tensor], torch.Tensor]


def window_positions(length: int, window: int, stride: int) -> List[int]:
    """Return window start offsets along one axis so that windows cover [0, length).

    The last window is aligned with the end, so every pixel is covered and no window hangs
    over the edge. ``length`` must be at least ``window``.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than the window {window}, leaving gaps")
    if length < window:
        raise ValueError(f"axis of {length} pixels is shorter than the window {window}")
    positions = list(range(0, length - window + 1, stride))
    if positions[-1] != length - window:
        positions.append(length - window)
    return positions


def _ring_spans(start: int, stop: int, size: int) -> List[Tuple[int, int, int]]:
    """Split image rows [start, stop) into runs of a ring buffer of ``size`` rows.

    Returns:
        (buffer_start, buffer_stop, offset) triples, where ``offset`` is the position of the
        run's first row within [start, stop).
    """
    length = stop - start
    assert 0 <= length <= size
    first = start % size
    if first + length <= size:
        return [(first, first + length, 0)]
    head = size - first
    return [(first, size, 0), (0, length - head, head)]


def source_rows(source_length: int, output_length: int) -> Tuple[np.ndarray, ...]:
    """Return, per output row, the two source rows and the weight of the second one.

    This is the index arithmetic of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis, in float32 as PyTorch's CPU kernel computes it.
    """
    scale = np.float32(source_length / output_length)
    position = (np.arange(output_length, dtype=np.float32) + np.float32(0.5)) * scale
    position = np.maximum(position - np.float32(0.5), np.float32(0.0))
    low = position.astype(np.int64)
    high = np.minimum(low + 1, source_length - 1)
    return low, high, position - low.astype(np.float32)


def interpolate_rows(
    source: torch.Tensor, source_top: int, rows: Tuple[np.ndarray, ...], output_width: int
) -> torch.Tensor:
    """Bilinearly interpolate output rows from a block of source rows.

    Args:
        source: T x n x w source rows, starting at source row ``source_top``.
        rows: the (low, high, weight) arrays of ``source_rows`` for the wanted output rows.
        output_width: W, the output width.

    Returns:
        T x len(rows[0]) x W scores.
    """
    low, high, weight = rows
    low_rows = source[:, torch.as_tensor(low - source_top, device=source.device)]
    high_rows = source[:, torch.as_tensor(high - source_top, device=source.device)]
    weight = torch.as_tensor(weight, dtype=source.dtype, device=source.device).view(1, -1, 1)
    blended = low_rows * (1 - weight) + high_rows * weight
    if blended.shape[-1] == output_width:
        return blended
    # T x rows x w is read as N x C x L, so "linear" interpolates along the width alone.
    return F.interpolate(blended, size=output_width, mode="linear", align_corners=False)


class RowResizer:
    """Bilinearly resize T x H x W scores that arrive in consecutive blocks of rows.

    The result matches ``F.interpolate(mode="bilinear", align_corners=False)`` of the whole
    volume up to float rounding, but only the source rows that later output rows still need
    are kept.
    """

    def __init__(self, source_size: Tuple[int, int], output_size: Tuple[int, int],
                 emit_rows: RowsCallback):
        self.output_size = tuple(output_size)
        self.identity = tuple(source_size) == self.output_size
        self.rows = source_rows(source_size[0], output_size[0])
        self.emit_rows = emit_rows
        self.buffer: Optional[torch.Tensor] = None
        self.buffer_top = 0
        self.next_row = 0

    def push(self, scores: torch.Tensor) -> None:
        """Add the next T x n x w block of source rows and emit every output row it completes."""
        if self.identity:
            end = self.next_row + scores.shape[1]
            self.emit_rows(self.next_row, end, scores)
            self.next_row = end
            return
        buffer = scores if self.buffer is None else torch.cat([self.buffer, scores], dim=1)
        available = self.buffer_top + buffer.shape[1]
        low, high, weight = self.rows

        # Output rows are ready once their lower source row has arrived.
        end = int(np.searchsorted(high, available, side="left"))
        if end > self.next_row:
            selected = slice(self.next_row, end)
            rows = (low[selected], high[selected], weight[selected])
            resized = interpolate_rows(buffer, self.buffer_top, rows, self.output_size[1])
            self.emit_rows(self.next_row, end, resized)
            self.next_row = end

        # Keep only the source rows from the first one that a later output row reads. When
        # that row has not arrived yet, the buffer is emptied and stays aligned with the input.
        keep_from = min(int(low[end]), available) if end < len(low) else available
        self.buffer = buffer[:, keep_from - self.buffer_top :]
        self.buffer_top = keep_from


# Cost of interpolating one candidate at one pixel from scattered reads, in units of
# interpolating one class at one pixel along whole rows: 56 ns against 4.5 ns, one thread of
# the 2-core x86 test machine.
_GATHER_COST = 12


def _cell_bounds(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the T x h x w maximum and minimum of each class over the corners of each cell.

    Cell (i, j) has its corners at rows i and min(i + 1, h - 1) and columns j and
    min(j + 1, w - 1). These are the four source values that bilinear interpolation blends
    for the output pixels whose lower source indices are (i, j).
    """
    padded = F.pad(scores[None], (0, 1, 0, 1), mode="replicate")[0]
    row_max = torch.maximum(padded[:, :-1], padded[:, 1:])
    row_min = torch.minimum(padded[:, :-1], padded[:, 1:])
    del padded
    upper = torch.maximum(row_max[:, :, :-1], row_max[:, :, 1:])
    lower = torch.minimum(row_min[:, :, :-1], row_min[:, :, 1:])
    return upper, lower


def bilinear_argmax(
    scores: torch.Tensor,
    output_size: Tuple[int, int],
    *,
    candidates: int = 8,
    max_block_elements: int = 1 << 24,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the top class of the bilinear resize of T x h x w ``scores`` to ``output_size``.

    The result equals ``F.interpolate(scores[None], output_size, mode="bilinear",
    align_corners=False)[0].max(dim=0)`` up to float rounding (where two classes are closer
    than that, either may win), without building the T x H x W resized volume.

    An interpolated value is a convex combination of the four source values around it, so it
    lies between their minimum and maximum. In each source cell (the four values shared by a
    patch of output pixels), the ``candidates`` classes with the highest maxima are
    interpolated first. A pixel's winner is certain when it beats the highest maximum of the
    classes left out. The few pixels where it does not are recomputed with every class that
    can still win there, that is, every class whose maximum reaches the largest minimum of any
    class.

    Args:
        scores: T x h x w floating-point scores.
        output_size: (H, W).
        candidates: classes interpolated per cell in the first pass.
        max_block_elements: bound on the candidates x pixels values interpolated at once.

    Returns:
        (labels, values): H x W int64 class indices and the H x W winning scores.
    """
    if scores.dim() != 3 or min(scores.shape) == 0:
        raise ValueError(f"expected T x h x w scores with T, h, w >= 1, got {tuple(scores.shape)}")
    height, width = (int(side) for side in output_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid output size {tuple(output_size)}: both sides must be positive")

    # Classes that are constant over the map (those a decoder left out above its class
    # budget) score their value at every pixel, so only the best of them needs comparing.
    flat = scores.flatten(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    if not bool(constant.any()):
        return _bilinear_argmax(scores, (height, width), candidates, max_block_elements)
    constant_values = torch.where(constant, flat[:, 0], float("-inf"))
    constant_value, constant_label = constant_values.max(dim=0)  # the lowest index on ties
    varying = torch.nonzero(~constant).squeeze(1)
    if not varying.numel():
        labels = torch.full((height, width), int(constant_label), device=scores.device)
        return labels, torch.full((height, width), float(constant_value), dtype=scores.dtype,
                                  device=scores.device)
    labels, values = _bilinear_argmax(scores[varying], (height, width), candidates,
                                      max_block_elements)
    labels = varying[labels]
    use_constant = (constant_value > values) | ((constant_value == values)
                                                & (constant_label < labels))
    labels[use_constant] = constant_label
    values[use_constant] = constant_value
    return labels, values


def _bilinear_argmax(scores, output_size, candidates, max_block_elements):
    """Compute ``bilinear_argmax`` for scores with no constant class."""
    height, width = output_size
    num_classes = scores.shape[0]
    rows = source_rows(scores.shape[1], height)
    columns = source_rows(scores.shape[2], width)

    # Bounds of each class over the four corners of every source cell (i, j): rows i and
    # min(i + 1, h - 1), and the same for columns.
    upper, lower = _cell_bounds(scores)
    floor = lower.amax(dim=0)
    del lower

    count = max(1, min(int(candidates), num_classes))
    ranked = _top_classes(upper.flatten(1), min(count + 1, num_classes))
    # Sorting by class index makes ties resolve to the lower index, as argmax does.
    chosen = ranked.indices[:count].sort(dim=0).values.view(count, *upper.shape[1:])
    labels, values = _argmax_on_grid(scores, chosen, rows, columns, max_block_elements)
    if count == num_classes:
        return labels, values

    # A left-out class scores at most its maximum over the cell, so the pixel is certain when
    # the winner is above the highest such maximum.
    row_cells = torch.as_tensor(rows[0], device=scores.device)
    column_cells = torch.as_tensor(columns[0], device=scores.device)
    excluded_best = ranked.values[count].view(upper.shape[1:])[row_cells][:, column_cells]
    uncertain = torch.nonzero(values <= excluded_best)
    if not uncertain.numel():
        return labels, values
    able = upper >= floor
    ys, xs = uncertain[:, 0], uncertain[:, 1]
    cells = torch.unique(row_cells[ys] * scores.shape[2] + column_cells[xs])
    needed = int(able.flatten(1)[:, cells].sum(dim=0).max())
    if needed * len(ys) * _GATHER_COST < num_classes * len(torch.unique(ys)) * width:
        fixed_labels, fixed_values = _argmax_at_pixels(
            scores, upper, needed, ys, xs, rows, columns, max_block_elements)
        labels[ys, xs] = fixed_labels
        values[ys, xs] = fixed_values
    else:
        # Nearly flat scores leave most classes in the running: interpolating every class
        # along the affected rows is then cheaper than gathering candidates pixel by pixel.
        _argmax_dense_rows(scores, rows, columns, torch.unique(ys).tolist(), labels, values,
                           max_block_elements)
    return labels, values


def _argmax_dense_rows(scores, rows, columns, row_indices, labels, values, max_block_elements):
    """Interpolate every class along the output rows ``row_indices`` and keep the top one."""
    width = len(columns[0])
    block = max(1, max_block_elements // (scores.shape[0] * width))
    for start in range(0, len(row_indices), block):
        selected = np.asarray(row_indices[start : start + block])
        block_rows = tuple(part[selected] for part in rows)
        # Rows are interpolated from the whole source, so its top is row 0.
        blended = interpolate_rows(scores, 0, block_rows, width)
        best, position = blended.max(dim=0)
        index = torch.as_tensor(selected, device=scores.device)
        labels[index] = position
        values[index] = best


def _top_classes(values: torch.Tensor, count: int):
    """Compute ``values.topk(count, dim=0)`` for T x N values along contiguous rows.

    topk along the first dimension of a T x N tensor strides through memory. On the N x T
    transpose it reads each row once, which is several times faster for thousands of classes.
    """
    ranked = values.t().contiguous().topk(count, dim=1)
    return torch.return_types.topk((ranked.values.t(), ranked.indices.t()))


def _argmax_on_grid(scores, chosen, rows, columns, max_block_elements):
    """Interpolate the K x h x w ``chosen`` classes of each cell over every output pixel."""
    device, dtype = scores.device, scores.dtype
    row_low, _, row_weight = rows
    column_low, _, column_weight = columns
    height, width = len(row_low), len(column_low)
    count = chosen.shape[0]

    # Candidate scores at the four corners of each cell, gathered on the source grid.
    source_height, source_width = scores.shape[1:]
    top = torch.arange(source_height, device=device).view(1, -1, 1)
    bottom = (top + 1).clamp(max=source_height - 1)
    left_column = torch.arange(source_width, device=device).view(1, 1, -1)
    right_column = (left_column + 1).clamp(max=source_width - 1)
    top_left, top_right = scores[chosen, top, left_column], scores[chosen, top, right_column]
    bottom_left = scores[chosen, bottom, left_column]
    bottom_right = scores[chosen, bottom, right_column]

    cell_columns = torch.as_tensor(column_low, device=device)
    column_weight = torch.as_tensor(column_weight, dtype=dtype, device=device)
    labels = torch.empty(height, width, dtype=torch.int64, device=device)
    values = torch.empty(height, width, dtype=dtype, device=device)
    block = max(1, max_block_elements // (count * width))
    for start in range(0, height, block):
        stop = min(start + block, height)
        cell_rows = torch.as_tensor(row_low[start:stop], device=device)
        weight = torch.as_tensor(row_weight[start:stop], dtype=dtype, device=device).view(1, -1, 1)
        # Rows first on the cell grid, then columns per output pixel, in the order that
        # interpolate_rows uses.
        left = top_left[:, cell_rows] * (1 - weight) + bottom_left[:, cell_rows] * weight
        right = top_right[:, cell_rows] * (1 - weight) + bottom_right[:, cell_rows] * weight
        blended = (left.index_select(2, cell_columns) * (1 - column_weight)
                   + right.index_select(2, cell_columns) * column_weight)
        best, position = blended.max(dim=0)
        labels[start:stop] = chosen[position, cell_rows[:, None], cell_columns[None, :]]
        values[start:stop] = best
    return labels, values


def _argmax_at_pixels(scores, upper, count, ys, xs, rows, columns, max_block_elements):
    """Interpolate, at the pixels (ys, xs), every class that can win in their cells."""
    device, dtype = scores.device, scores.dtype
    row_low, row_high, row_weight = (torch.as_tensor(values, device=device) for values in rows)
    column_low, column_high, column_weight = (
        torch.as_tensor(values, device=device) for values in columns)
    r0, r1, c0, c1 = row_low[ys], row_high[ys], column_low[xs], column_high[xs]
    row_weight = row_weight[ys].to(dtype)
    column_weight = column_weight[xs].to(dtype)

    flat_cells = r0 * scores.shape[2] + c0
    cells, pixel_cell = torch.unique(flat_cells, return_inverse=True)
    cell_upper = upper.flatten(1)[:, cells]
    chosen = _top_classes(cell_upper, count).indices.sort(dim=0).values  # count x cells

    labels = torch.empty(len(ys), dtype=torch.int64, device=device)
    values = torch.empty(len(ys), dtype=dtype, device=device)
    block = max(1, max_block_elements // count)
    for start in range(0, len(ys), block):
        part = slice(start, start + block)
        classes = chosen[:, pixel_cell[part]]

        def at(source_rows_index, source_columns):
            return scores[classes, source_rows_index[part], source_columns[part]]

        weight = row_weight[part]
        left = at(r0, c0) * (1 - weight) + at(r1, c0) * weight
        right = at(r0, c1) * (1 - weight) + at(r1, c1) * weight
        blended = left * (1 - column_weight[part]) + right * column_weight[part]
        best, position = blended.max(dim=0)
        labels[part] = classes.gather(0, position[None])[0]
        values[part] = best
    return labels, values


def blend_rows_with_view(
    view_scores: torch.Tensor, weight: float, output_size: Tuple[int, int],
    emit_rows: RowsCallback,
) -> RowsCallback:
    """Wrap ``emit_rows`` so that each block of rows is averaged with a second view.

    ``view_scores`` are T x h x w scores, for example the whole image at the decoder's
    resolution. Their bilinear resize to ``output_size`` enters each block with ``weight``.
    """
    rows = source_rows(view_scores.shape[1], output_size[0])

    def emit(row_start: int, row_end: int, scores: torch.Tensor) -> None:
        block_rows = tuple(values[row_start:row_end] for values in rows)
        view = interpolate_rows(view_scores, 0, block_rows, output_size[1])
        emit_rows(row_start, row_end, (1 - weight) * scores + weight * view)

    return emit


def score_downsample_factor(window: int, stride: int, score_side: int) -> int:
    """Return the largest factor by which sliding-window scores can be kept below full size.

    The factor ``d`` divides the window and the stride, so every window lands on whole cells
    of a grid ``d`` times coarser than the image. ``window / d`` stays at least ``score_side``,
    the side of the decoder's own output, so no predicted detail is lost.

    Args:
        window, stride: the sliding window's side and step, in pixels.
        score_side: the side of the score map the model predicts for one window.
    """
    if score_side <= 0:
        raise ValueError(f"invalid score side {score_side}: it must be a positive number of pixels")
    for factor in range(max(1, window // score_side), 1, -1):
        if window % factor == 0 and stride % factor == 0:
            return factor
    return 1


WINDOW_BLENDS = ("uniform", "tent")


def window_weights(side: int, blend: str) -> torch.Tensor:
    """Return the 1 x side x side weight of one window's scores in the overlap average.

    "uniform" weighs every cell 1. "tent" weighs a cell by the product, over rows and
    columns, of 1 - |2 (i + 0.5) / side - 1|: near 1 at the centre and 1 / side at the
    edges, never 0, so every covered pixel keeps a positive total weight.
    """
    if blend not in WINDOW_BLENDS:
        raise ValueError(
            f"invalid window blend {blend!r}; expected one of {WINDOW_BLENDS} "
            "(MODEL.SKYSENSE_O.INFERENCE.WINDOW_BLEND)"
        )
    if blend == "uniform":
        return torch.ones(1, side, side)
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    tent = 1 - (2 * centres - 1).abs()
    return (tent[:, None] * tent[None, :])[None]


def padded_length(length: int, window: int, score_downsample: int = 1) -> int:
    """Return the smallest length >= ``length`` and >= ``window`` that windows tile on a grid of
    ``score_downsample`` pixels (the last window then starts at a multiple of it)."""
    extra = max(0, length - window)
    return window + math.ceil(extra / score_downsample) * score_downsample


def sliding_window_scores(
    image: torch.Tensor,
    predict: WindowPredictor,
    *,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int,
    emit_rows: RowsCallback,
    emit_block_rows: int = 32,
    score_downsample: int = 1,
    blend: str = "uniform",
) -> None:
    """Average window predictions over a large image, streaming finished rows to a callback.

    Scores are averaged on a grid ``score_downsample`` (d) times coarser than the image: each
    window's scores arrive at side ``window / d``, and the averaged grid is resized bilinearly
    to the image's size as its rows are finished. A decoder predicts at a fraction of the
    window's resolution, so averaging there loses nothing, and the buffers shrink by d squared.

    Windows are processed one row of windows at a time. Scores accumulate in a ring buffer of
    ``window / d`` grid rows (T x window/d x W/d floats), allocated once, because only those
    rows can still receive predictions. Memory therefore does not depend on the image height.
    Finished rows are passed on in blocks of about ``emit_block_rows`` image rows, which
    bounds the size of each block.

    Args:
        image: 1 x C x H x W image (normalised, or raw if ``predict`` normalises its crops)
            with H, W >= ``window``; with d > 1, H - window and W - window must be multiples
            of d (see ``padded_length``).
        predict: the window predictor (already in eval mode, called under no_grad), returning
            N x T x (window / d) x (window / d) scores.
        num_classes: T, the number of score channels ``predict`` returns.
        window, stride: window side and step, in pixels.
        batch_size: windows per call of ``predict``.
        emit_rows: called with (row_start, row_end, scores) for consecutive row ranges that
            together cover [0, H) exactly once, in order; scores are T x rows x W.
        emit_block_rows: the number of image rows passed in one call of ``emit_rows``; with
            d > 1, a block may have up to d rows more or fewer.
        score_downsample: d, from ``score_downsample_factor``; 1 averages at full resolution.
        blend: how overlapping windows are weighted, see ``window_weights``.
    """
    height, width = image.shape[-2:]
    rows_y = window_positions(height, window, stride)
    columns_x = window_positions(width, window, stride)
    factor = score_downsample
    if factor < 1 or window % factor or stride % factor:
        raise ValueError(
            f"score downsampling factor {factor} must be a positive divisor of the window "
            f"({window}) and the stride ({stride}); use score_downsample_factor()"
        )
    if (height - window) % factor or (width - window) % factor:
        raise ValueError(
            f"an image of {height} x {width} pixels does not tile on the {factor}-pixel grid "
            f"of the window ({window}); pad it to padded_length() first"
        )
    cell = window // factor
    grid_height, grid_width = height // factor, width // factor
    scores = torch.zeros(num_classes, cell, grid_width, dtype=torch.float32, device=image.device)
    counts = torch.zeros(1, cell, grid_width, dtype=torch.float32, device=image.device)
    weights = window_weights(cell, blend).to(image.device)
    resizer = RowResizer((grid_height, grid_width), (height, width), emit_rows)
    block_rows = max(1, emit_block_rows // factor)
    emitted_until = 0

    for index, top in enumerate(rows_y):
        grid_top = top // factor
        for start in range(0, len(columns_x), batch_size):
            lefts = columns_x[start : start + batch_size]
            crops = torch.cat([image[..., top : top + window, x : x + window] for x in lefts])
            predictions = predict(crops).to(torch.float32)
            if tuple(predictions.shape[-2:]) != (cell, cell):
                raise ValueError(
                    f"the window predictor returned {tuple(predictions.shape[-2:])} scores per "
                    f"window; expected {(cell, cell)} (window {window} / factor {factor})"
                )
            for left, prediction in zip(lefts, predictions):
                grid_left = left // factor
                weighted = prediction * weights
                for first, last, offset in _ring_spans(grid_top, grid_top + cell, cell):
                    rows = slice(offset, offset + last - first)
                    scores[:, first:last, grid_left : grid_left + cell] += weighted[:, rows]
                    counts[:, first:last, grid_left : grid_left + cell] += weights[:, rows]

        # Grid rows above the next row of windows receive no more predictions: pass them on
        # and clear their buffer rows for the rows that will wrap onto them.
        finished_until = rows_y[index + 1] // factor if index + 1 < len(rows_y) else grid_height
        for block_start in range(emitted_until, finished_until, block_rows):
            block_stop = min(block_start + block_rows, finished_until)
            for first, last, _ in _ring_spans(block_start, block_stop, cell):
                resizer.push(scores[:, first:last] / counts[:, first:last])
                scores[:, first:last] = 0
                counts[:, first:last] = 0
        emitted_until = finished_until
    if resizer.next_row != height:
        raise RuntimeError(f"sliding window emitted {resizer.next_row} of {height} rows")


def merge_synonym_scores(
    scores: torch.Tensor, synonym_groups: Optional[Sequence[Sequence[int]]]
) -> torch.Tensor:
    """Retrieval augmentation: each class scores the maximum over itself and its synonyms.

    Args:
        scores: ... x N x H x W scores for the N = T + S names (classes first, then synonyms).
        synonym_groups: for each of the T classes, the channel indices of its synonyms
            (possibly empty); None when there are no synonyms.

    Returns:
        ... x T x H x W scores of the classes alone.
    """
    if not synonym_groups:
        return scores
    num_classes = len(synonym_groups)
    merged = [
        torch.amax(scores[..., [index, *group], :, :], dim=-3) if group else scores[..., index, :, :]
        for index, group in enumerate(synonym_groups)
    ]
    result = torch.stack(merged, dim=-3)
    assert result.shape[-3] == num_classes
    return result


def expand_with_synonyms(
    class_names: Sequence[str], synonyms: Optional[Sequence[Sequence[str]]]
) -> Tuple[List[str], Optional[List[List[int]]]]:
    """Append the synonyms of each class to the name list.

    Returns:
        (names, groups): all names to encode (classes first), and for each class the indices of
        its synonyms in ``names`` (None when no class has synonyms).
    """
    if not synonyms or not any(synonyms):
        return list(class_names), None
    if len(synonyms) != len(class_names):
        raise ValueError(
            f"{len(synonyms)} synonym lists were given for {len(class_names)} classes; "
            "give one list (possibly empty) per class"
        )
    names = list(class_names)
    groups: List[List[int]] = []
    for group in synonyms:
        groups.append(list(range(len(names), len(names) + len(group))))
        names.extend(group)
    return names, groups
