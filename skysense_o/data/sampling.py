"""Dynamic text sampling: the class names a training image is taught with in one iteration.

The text list of an image is its own classes (the positives, in ``ann_list`` order, each name
once) followed by negatives drawn without replacement until ``text_batch`` names are reached:

1. With a graph, the candidate negatives are the names that are negatives (score in
   [neg_low, neg_high]) of **every** class of the image that appears in the graph.
2. The image's own classes are removed from the candidates, and so are the graph positives of
   each of them (score in [pos_low, pos_high], in either direction). A name that is visually
   the same thing as a class in the image must never be taught as its negative.
3. If no candidate is left (or no class of the image is in the graph), the candidates are all
   graph nodes, or without a graph the dataset vocabulary, minus the same excluded names.
4. The candidates are sorted before drawing, so the result depends only on the generator's
   state and never on set iteration order or hash seeds.

The release hard-codes the thresholds and never uses the positives; this module honours the
configured ``SAMPLING_HYPER`` for both.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, List, Optional, Sequence, Set

import numpy as np

from .graph import VisualRelevanceGraph, canonical_name, validate_sampling_hyper

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextSample:
    """The text list of one image for one iteration.

    Attributes:
        texts: the image's classes (each name once, in their first order) then the negatives.
        num_positives: how many leading entries of ``texts`` are the image's own classes.
        graph_sampled: whether a graph chose the negatives (so graph-weighted losses apply).
    """

    texts: List[str]
    num_positives: int
    graph_sampled: bool


def unique_names(class_names: Iterable[str]) -> List[str]:
    """Return ``class_names`` without repeats (compared by ``canonical_name``), in order."""
    seen: Set[str] = set()
    names = []
    for name in class_names:
        key = canonical_name(name)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _excluded_keys(
    positives: Sequence[str], graph: Optional[VisualRelevanceGraph], hyper: Sequence[int]
) -> Set[str]:
    """Return the keys never sampled as negatives: the classes and their graph positives."""
    excluded = {canonical_name(name) for name in positives}
    if graph is not None:
        for name in positives:
            for related in graph.positives(name, hyper) | graph.positives(
                name, hyper, incoming=True
            ):
                excluded.add(canonical_name(related))
    return excluded


def _graph_candidates(
    positives: Sequence[str], graph: VisualRelevanceGraph, hyper: Sequence[int]
) -> List[str]:
    """Return the names that are negatives of every class of the image found in the graph."""
    present = [name for name in positives if name in graph]
    if not present:
        return []
    common = set(graph.negatives(present[0], hyper))
    for name in present[1:]:
        common &= graph.negatives(name, hyper)
    return list(common)


def _filter_sorted(names: Iterable[str], excluded: Set[str]) -> List[str]:
    """Drop excluded names and repeats, then sort, so sampling never depends on set order."""
    first_spelling = {}
    for name in names:
        key = canonical_name(name)
        if key not in excluded:
            first_spelling.setdefault(key, name)
    return [first_spelling[key] for key in sorted(first_spelling)]


def sample_texts(
    class_names: Sequence[str],
    *,
    text_batch: int,
    rng: np.random.Generator,
    graph: Optional[VisualRelevanceGraph] = None,
    hyper: Sequence[int] = (1, 3, 9, 10),
    vocabulary: Sequence[str] = (),
) -> TextSample:
    """Build the text list of one image (rules in the module docstring).

    Args:
        class_names: the image's classes in ``ann_list`` order (repeats are dropped).
        text_batch: the number of names wanted (config DATASETS.SKYSA.TEXT_BATCH). An image
            with more classes keeps all of them and gets no negatives.
        rng: the generator that draws the negatives.
        graph: the visual-relevance graph, or None.
        hyper: ``[neg_low, neg_high, pos_low, pos_high]`` (config DATASETS.SKYSA.SAMPLING_HYPER).
        vocabulary: the names to draw from when there is no graph.

    Returns:
        The sampled :class:`TextSample`. It has fewer than ``text_batch`` names when there are
        not enough candidates.
    """
    if text_batch < 1:
        raise ValueError(f"TEXT_BATCH must be a positive integer, got {text_batch}")
    hyper = validate_sampling_hyper(hyper)
    positives = unique_names(class_names)
    excluded = _excluded_keys(positives, graph, hyper)

    # Candidates: the common graph negatives, else the whole graph or vocabulary.
    candidates: List[str] = []
    if graph is not None:
        candidates = _filter_sorted(_graph_candidates(positives, graph, hyper), excluded)
    if not candidates:
        pool = graph.nodes if graph is not None else vocabulary
        candidates = _filter_sorted(pool, excluded)

    # Draw without replacement up to the text budget.
    num_negatives = min(max(text_batch - len(positives), 0), len(candidates))
    chosen = rng.choice(len(candidates), size=num_negatives, replace=False)
    negatives = [candidates[i] for i in chosen]
    return TextSample(
        texts=positives + negatives,
        num_positives=len(positives),
        graph_sampled=graph is not None,
    )
