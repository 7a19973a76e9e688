"""Tests of the visual-relevance graph parser and its queries."""

import json
import logging
import os

import pytest
from detectron2.data import MetadataCatalog

from skysense_o.data.graph import (
    VisualRelevanceGraph,
    canonical_name,
    load_graph,
    parse_graph_lines,
    resolve_graph_file,
    validate_sampling_hyper,
)

TD = "{tuple_delimiter}"
HYPER = (1, 3, 9, 10)


def relationship(source: str, target: str, score: str, delimiter: str = TD) -> str:
    fields = ['"relationship"', f'"{source}"', f'"{target}"', f'"{score}"']
    return "(" + delimiter.join(fields) + ")"


def test_parse_release_delimiter():
    graph, report = parse_graph_lines([relationship("building", "road", "2")])
    assert graph.score("building", "road") == 2
    assert report.relationships == 1
    assert report.malformed == 0
    assert graph.nodes == ("building", "road")


def test_parse_graphrag_delimiter_and_separators():
    line = (
        relationship("road", "street", "9", "<|>")
        + "##"
        + relationship("road", "river", "1", "<|>")
        + "<|COMPLETE|>"
    )
    graph, report = parse_graph_lines([line])
    assert graph.score("road", "street") == 9
    assert graph.score("road", "river") == 1
    assert report.relationships == 2


def test_parse_json_string_line():
    record = relationship("forest", "tree", "10")[:-1] + f'{TD}"extra description")'
    graph, _ = parse_graph_lines([json.dumps(record)])
    assert graph.score("forest", "tree") == 10


def test_parse_stray_parenthesis_after_score():
    graph, _ = parse_graph_lines([relationship("a", "b", "10") + f'{TD}"trailing field"'])
    assert graph.score("a", "b") == 10


def test_parse_json_list_line():
    line = json.dumps([relationship("a", "b", "4"), relationship("a", "c", "5")])
    graph, report = parse_graph_lines([line])
    assert graph.score("a", "b") == 4
    assert graph.score("a", "c") == 5
    assert report.relationships == 2


def test_parse_noise_quotes_and_parentheses():
    line = "'" + relationship("land (unpaved area)", "'water'", "3") + "'"
    graph, _ = parse_graph_lines(["", "   ", line])
    assert graph.score("land (unpaved area)", "water") == 3
    assert "land (unpaved area)" in graph


def test_parse_skips_entities():
    entity = "(" + TD.join(['"entity"', '"BUILDING"', '"category"', '"a house"']) + ")"
    graph, report = parse_graph_lines([entity, relationship("building", "road", "2")])
    assert report.skipped_records == 1
    assert graph.nodes == ("building", "road")


def test_parse_counts_malformed(caplog):
    lines = [
        relationship("a", "b", "2"),
        relationship("a", "c", "high"),
        relationship("a", "d", "8.5"),
        "(" + TD.join(['"relationship"', '"a"', '"e"']) + ")",
        relationship("", "f", "3"),
    ]
    graph, report = parse_graph_lines(lines)
    assert report.malformed == 4
    assert report.malformed_line_numbers == [2, 3, 4, 5]
    assert graph.nodes == ("a", "b")


def test_malformed_lines_logged(tmp_path, caplog):
    path = tmp_path / "graph.jsonl"
    path.write_text(relationship("a", "b", "2") + "\n" + relationship("a", "c", "x") + "\n")
    with caplog.at_level(logging.WARNING, logger="skysense_o.data.graph"):
        load_graph(path)
    assert "1 malformed" in caplog.text
    assert "lines 2" in caplog.text


@pytest.mark.parametrize("score", ["0", "11", "-3"])
def test_score_out_of_range_names_line(score):
    lines = [relationship("a", "b", "2"), relationship("a", "c", score)]
    with pytest.raises(ValueError, match=f"line 2: score {int(score)}"):
        parse_graph_lines(lines, source="g.jsonl")


def test_duplicates_keep_last():
    lines = [
        relationship("a", "b", "2"),
        relationship("A", "b", "7"),
        relationship("a", "b", "7"),
    ]
    graph, report = parse_graph_lines(lines)
    assert graph.score("a", "b") == 7
    assert report.duplicates == 2
    assert report.changed_duplicates == 1
    assert graph.num_edges == 1


def test_first_spelling_kept():
    graph, _ = parse_graph_lines([relationship("Building", "ROAD", "2")])
    assert graph.nodes == ("Building", "ROAD")
    assert graph.score("building", "road") == 2
    assert "  building " in graph


def test_score_is_directed_and_absent_is_none():
    graph, _ = parse_graph_lines([relationship("a", "b", "3")])
    assert graph.score("a", "b") == 3
    assert graph.score("b", "a") is None
    assert graph.score("a", "zzz") is None
    assert graph.score("zzz", "a") is None


def test_negatives_and_positives_follow_thresholds():
    lines = [
        relationship("a", "b", "1"),
        relationship("a", "c", "3"),
        relationship("a", "d", "4"),
        relationship("a", "e", "9"),
        relationship("a", "f", "10"),
        relationship("g", "a", "10"),
    ]
    graph, _ = parse_graph_lines(lines)
    assert graph.negatives("a", HYPER) == {"b", "c"}
    assert graph.positives("a", HYPER) == {"e", "f"}
    assert graph.positives("a", HYPER, incoming=True) == {"g"}
    assert graph.negatives("a", (1, 4, 9, 10)) == {"b", "c", "d"}
    assert graph.positives("a", (1, 3, 10, 10)) == {"f"}
    assert graph.negatives("absent", HYPER) == frozenset()


@pytest.mark.parametrize(
    "hyper",
    [(1, 3, 9), (0, 3, 9, 10), (1, 3, 9, 11), (4, 3, 9, 10), (1, 3, 10, 9), (1.0, 3, 9, 10)],
)
def test_invalid_sampling_hyper(hyper):
    with pytest.raises(ValueError, match="SAMPLING_HYPER"):
        validate_sampling_hyper(hyper)


def test_empty_graph_file_names_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_graph(path)


def test_graph_without_relationship(tmp_path):
    path = tmp_path / "entities.jsonl"
    path.write_text('("entity"{tuple_delimiter}"a"{tuple_delimiter}"t")\n')
    with pytest.raises(ValueError, match="no valid relationship"):
        load_graph(path)


def test_missing_graph_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_graph(tmp_path / "missing.jsonl")


def test_load_graph_cached_until_changed(tmp_path):
    path = tmp_path / "graph.jsonl"
    path.write_text(relationship("a", "b", "2") + "\n")
    first = load_graph(path)
    assert load_graph(str(path)) is first

    path.write_text(relationship("a", "b", "5") + "\n" + relationship("a", "c", "1") + "\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = load_graph(path)
    assert second is not first
    assert second.score("a", "b") == 5


def test_graph_from_edges():
    graph = VisualRelevanceGraph({("x", "y"): 4})
    assert len(graph) == 2
    assert graph.num_edges == 1
    assert canonical_name("  Solar   Panel ") == "solar panel"


def test_resolve_graph_file():
    name = "test_graph_resolution_metadata"
    MetadataCatalog.get(name).graph_file = "/data/graph.jsonl"
    try:
        assert resolve_graph_file(name) == "/data/graph.jsonl"
        assert resolve_graph_file(name, "/other.jsonl") == "/other.jsonl"
        assert resolve_graph_file("test_graph_resolution_none") == ""
    finally:
        MetadataCatalog.remove(name)
        MetadataCatalog.remove("test_graph_resolution_none")
