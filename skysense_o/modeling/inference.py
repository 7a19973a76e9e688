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


def sliding_window_scores(
    image: torch.Tensor,
    predict: WindowPredictor,
    *,
    num_classes: int,
    window: int,
    stride: int,
    batch_size: int,
    emit_rows: RowsCallback,
) -> None:
    """Average window predictions over a large image, streaming finished rows to a callback.

    Windows are processed one row of windows at a time. Only the rows that a later window can
    still reach are kept, so the score buffer holds at most ``window`` rows of the image
    (T x window x W floats) however tall the image is.

    Args:
        image: 1 x 3 x H x W normalised image with H, W >= ``window``.
        predict: the window predictor (already in eval mode, called under no_grad).
        num_classes: T, the number of score channels ``predict`` returns.
        window, stride: window side and step, in pixels.
        batch_size: windows per call of ``predict``.
        emit_rows: called with (row_start, row_end, scores) for consecutive row ranges that
            together cover [0, H) exactly once, in order.
    """
    height, width = image.shape[-2:]
    rows_y = window_positions(height, window, stride)
    columns_x = window_positions(width, window, stride)
    dtype = torch.float32
    scores = torch.zeros(num_classes, 0, width, dtype=dtype, device=image.device)
    counts = torch.zeros(1, 0, width, dtype=dtype, device=image.device)
    buffer_top = 0

    for index, top in enumerate(rows_y):
        # Extend the buffer down to the bottom of this row of windows.
        missing = top + window - (buffer_top + scores.shape[1])
        if missing > 0:
            scores = torch.cat([scores, scores.new_zeros(num_classes, missing, width)], dim=1)
            counts = torch.cat([counts, counts.new_zeros(1, missing, width)], dim=1)

        for start in range(0, len(columns_x), batch_size):
            lefts = columns_x[start : start + batch_size]
            crops = torch.cat([image[..., top : top + window, x : x + window] for x in lefts])
            predictions = predict(crops).to(dtype)
            row = top - buffer_top
            for left, prediction in zip(lefts, predictions):
                scores[:, row : row + window, left : left + window] += prediction
                counts[:, row : row + window, left : left + window] += 1

        # Rows above the next row of windows receive no more predictions.
        finished_until = rows_y[index + 1] if index + 1 < len(rows_y) else height
        done = finished_until - buffer_top
        emit_rows(buffer_top, finished_until, scores[:, :done] / counts[:, :done])
        scores, counts = scores[:, done:], counts[:, done:]
        buffer_top = finished_until


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
