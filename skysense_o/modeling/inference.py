"""Inference helpers: sliding windows with bounded memory and retrieval augmentation."""

from typing import Callable, List, Optional, Sequence, Tuple

import torch

# Receives the class scores of rows [row_start, row_end) of the image: T x rows x W.
RowsCallback = Callable[[int, int, torch.Tensor], None]
# Maps N x 3 x window x window normalised crops to N x T x window x window class scores.
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
) -> None:
    """Average window predictions over a large image, streaming finished rows to a callback.

    Windows are processed one row of windows at a time. Scores accumulate in a ring buffer of
    ``window`` image rows (T x window x W floats), allocated once, because only those rows can
    still receive predictions; memory therefore does not depend on the image height. Finished
    rows are passed on in blocks of ``emit_block_rows`` rows to bound the size of each block.

    Args:
        image: 1 x 3 x H x W image (normalised, or raw if ``predict`` normalises its crops)
            with H, W >= ``window``.
        predict: the window predictor (already in eval mode, called under no_grad).
        num_classes: T, the number of score channels ``predict`` returns.
        window, stride: window side and step, in pixels.
        batch_size: windows per call of ``predict``.
        emit_rows: called with (row_start, row_end, scores) for consecutive row ranges that
            together cover [0, H) exactly once, in order.
        emit_block_rows: the largest number of rows passed in one call of ``emit_rows``.
    """
    height, width = image.shape[-2:]
    rows_y = window_positions(height, window, stride)
    columns_x = window_positions(width, window, stride)
    scores = torch.zeros(num_classes, window, width, dtype=torch.float32, device=image.device)
    counts = torch.zeros(1, window, width, dtype=torch.float32, device=image.device)
    emitted_until = 0

    for index, top in enumerate(rows_y):
        for start in range(0, len(columns_x), batch_size):
            lefts = columns_x[start : start + batch_size]
            crops = torch.cat([image[..., top : top + window, x : x + window] for x in lefts])
            predictions = predict(crops).to(torch.float32)
            for left, prediction in zip(lefts, predictions):
                for first, last, offset in _ring_spans(top, top + window, window):
                    rows = prediction[:, offset : offset + last - first]
                    scores[:, first:last, left : left + window] += rows
                    counts[:, first:last, left : left + window] += 1

        # Rows above the next row of windows receive no more predictions: pass them on and
        # clear their buffer rows for the rows that will wrap onto them.
        finished_until = rows_y[index + 1] if index + 1 < len(rows_y) else height
        for block_start in range(emitted_until, finished_until, emit_block_rows):
            block_stop = min(block_start + emit_block_rows, finished_until)
            for first, last, offset in _ring_spans(block_start, block_stop, window):
                row = block_start + offset
                emit_rows(row, row + last - first, scores[:, first:last] / counts[:, first:last])
                scores[:, first:last] = 0
                counts[:, first:last] = 0
        emitted_until = finished_until


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
