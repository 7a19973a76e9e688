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
