"""Tests of dynamic text sampling."""

import numpy as np
import pytest

from skysense_o.data.graph import VisualRelevanceGraph
from skysense_o.data.sampling import sample_texts, unique_names

HYPER = (1, 3, 9, 10)


def make_graph() -> VisualRelevanceGraph:
    edges = {
        # Negatives of "building": road, water, sand, forest; of "road": water, sand, roof.
        ("building", "road"): 1,
        ("building", "water"): 2,
        ("building", "sand"): 3,
        ("building", "forest"): 1,
        ("road", "water"): 1,
        ("road", "sand"): 2,
        ("road", "roof"): 3,
        ("road", "building"): 1,
        # Positives: "house" is the same thing as "building"; "street" points to "road".
        ("building", "house"): 10,
        ("street", "road"): 9,
        ("road", "street"): 2,
        # A middling score is neither a negative nor a positive.
        ("building", "tower"): 6,
        ("lake", "pond"): 5,
    }
    return VisualRelevanceGraph(edges)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_positives_first_in_order():
    sample = sample_texts(["road", "building"], text_batch=3, rng=rng(), graph=make_graph())
    assert sample.texts[:2] == ["road", "building"]
    assert sample.num_positives == 2
    assert sample.graph_sampled is True


def test_negatives_are_intersection():
    sample = sample_texts(["building", "road"], text_batch=100, rng=rng(), graph=make_graph())
    # Common negatives of building {road, water, sand, forest} and road {water, sand, roof,
    # building, street}, minus the image's own classes.
    assert sorted(sample.texts[2:]) == ["sand", "water"]


def test_classes_absent_from_graph_are_ignored():
    sample = sample_texts(["building", "unknown"], text_batch=100, rng=rng(), graph=make_graph())
    assert sample.texts[:2] == ["building", "unknown"]
    assert sorted(sample.texts[2:]) == ["forest", "road", "sand", "water"]


def test_positives_never_sampled_as_negatives():
    edges = {("building", "house"): 10, ("building", "road"): 1, ("house", "road"): 2}
    graph = VisualRelevanceGraph(edges)
    # road has no outgoing edges, so its candidates are all other nodes.
    sample = sample_texts(["road"], text_batch=100, rng=rng(), graph=graph)
    assert "building" in sample.texts
    # building's only negative is road, and house (scored 10) is never drawn.
    sample = sample_texts(["building"], text_batch=100, rng=rng(), graph=graph)
    assert sample.texts == ["building", "road"]


def test_incoming_positive_excluded():
    graph = make_graph()
    # "street" -> "road" scores 9, so street is a positive of road in the incoming direction,
    # even though road -> street scores 2 (a negative).
    sample = sample_texts(["road"], text_batch=100, rng=rng(), graph=graph)
    assert "street" not in sample.texts
    assert sorted(sample.texts[1:]) == ["building", "roof", "sand", "water"]


def test_configured_thresholds_honoured():
    graph = make_graph()
    sample = sample_texts(["building"], text_batch=100, rng=rng(), graph=graph, hyper=(1, 1, 9, 10))
    assert sorted(sample.texts[1:]) == ["forest", "road"]
    sample = sample_texts(["building"], text_batch=100, rng=rng(), graph=graph, hyper=(1, 6, 9, 10))
    assert sorted(sample.texts[1:]) == ["forest", "road", "sand", "tower", "water"]


def test_positive_thresholds_change_exclusion():
    edges = {("a", "b"): 8, ("a", "c"): 2, ("x", "y"): 1}
    graph = VisualRelevanceGraph(edges)
    # c has no negatives, so the intersection is empty and all nodes are the candidates;
    # b (scored 8 from a) is excluded only when pos_low <= 8.
    sample = sample_texts(["a", "c"], text_batch=100, rng=rng(), graph=graph)
    assert sorted(sample.texts[2:]) == ["b", "x", "y"]
    sample = sample_texts(["a", "c"], text_batch=100, rng=rng(), graph=graph, hyper=(1, 3, 8, 10))
    assert sorted(sample.texts[2:]) == ["x", "y"]


def test_fallback_to_all_nodes_when_empty():
    graph = make_graph()
    sample = sample_texts(["lake"], text_batch=100, rng=rng(), graph=graph)
    expected = sorted(set(graph.nodes) - {"lake"})
    assert sorted(sample.texts[1:]) == expected


def test_fallback_to_vocabulary_without_graph():
    vocabulary = ["building", "road", "water", "tree"]
    sample = sample_texts(["road"], text_batch=100, rng=rng(), vocabulary=vocabulary)
    assert sample.texts[0] == "road"
    assert sorted(sample.texts[1:]) == ["building", "tree", "water"]
    assert sample.graph_sampled is False


def test_text_batch_limits_length():
    vocabulary = [f"class {i}" for i in range(50)]
    sample = sample_texts(["class 3", "class 7"], text_batch=10, rng=rng(), vocabulary=vocabulary)
    assert len(sample.texts) == 10
    assert sample.texts[:2] == ["class 3", "class 7"]
    assert len(set(sample.texts)) == 10


def test_more_classes_than_text_batch():
    names = ["a", "b", "c", "d"]
    sample = sample_texts(names, text_batch=2, rng=rng(), vocabulary=["e", "f"])
    assert sample.texts == names


def test_too_few_candidates():
    sample = sample_texts(["a"], text_batch=100, rng=rng(), vocabulary=["a", "b", "c"])
    assert sample.texts[0] == "a"
    assert sorted(sample.texts[1:]) == ["b", "c"]


def test_deterministic_with_seed():
    vocabulary = [f"class {i}" for i in range(200)]
    first = sample_texts(["x"], text_batch=20, rng=rng(7), vocabulary=vocabulary)
    second = sample_texts(["x"], text_batch=20, rng=rng(7), vocabulary=list(reversed(vocabulary)))
    other = sample_texts(["x"], text_batch=20, rng=rng(8), vocabulary=vocabulary)
    assert first.texts == second.texts
    assert first.texts != other.texts


def test_repeated_names_once():
    sample = sample_texts(["road", "Road", "water"], text_batch=3, rng=rng(), vocabulary=["sky"])
    assert sample.texts == ["road", "water", "sky"]
    assert unique_names(["a", "A ", "b"]) == ["a", "b"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="TEXT_BATCH"):
        sample_texts(["a"], text_batch=0, rng=rng())
    with pytest.raises(ValueError, match="SAMPLING_HYPER"):
        sample_texts(["a"], text_batch=5, rng=rng(), hyper=(3, 1, 9, 10))
