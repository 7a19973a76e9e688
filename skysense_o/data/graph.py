"""The visual-relevance graph of Sky-SA (``skysa_graph.jsonl``) and its parser.

The file is a GraphRAG-style extraction made by a vision-language model. Each relationship
record reads ``("relationship"<d>"<source>"<d>"<target>"<d>"<score>"...)`` where ``<d>`` is
the literal placeholder ``{tuple_delimiter}`` (as in the released file) or GraphRAG's usual
``<|>``. The score, an integer from 1 to 10, rates how visually related the two categories are
(10: visually the same thing). Fields after the score are ignored.

Parsing rules, chosen to be liberal about the noise an extraction model leaves behind:

* A line is either raw text or JSON. A JSON string is used as the text, and every string
  inside a JSON list or object is used, so ``["(...)", "(...)"]`` contains two records.
* Records are separated by newlines, ``##`` or ``{record_delimiter}``. The end markers
  ``<|COMPLETE|>`` and ``{completion_delimiter}`` are removed. Blank records are skipped.
* Outer parentheses, quotes and stray single quotes around a record and around each field
  are removed. The record type is matched case-insensitively.
* Entity records and any other record types are skipped.
* A relationship record with fewer than four fields, an empty name or a score that is not an
  integer (``"8.5"``, ``"high"``) is malformed: it is skipped, counted and its line number
  logged. An integer score outside 1..10 raises ValueError naming the line.
* Names are matched with case and repeated white space ignored (``canonical_name``), because
  extraction models often capitalise entity names. The spelling seen first is the one
  returned by ``nodes``, ``negatives`` and ``positives``.
* Scores are directed: ``score(a, b)`` is the score of the record with source ``a`` and
  target ``b``. A pair seen again keeps the last score; repeats are counted and logged,
  with a separate count of those that changed the score.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

from detectron2.data import MetadataCatalog

logger = logging.getLogger(__name__)

MIN_SCORE = 1
MAX_SCORE = 10

TUPLE_DELIMITERS = ("{tuple_delimiter}", "<|>")
RECORD_SEPARATORS = ("##", "{record_delimiter}")
COMPLETION_MARKERS = ("<|COMPLETE|>", "{completion_delimiter}")
RELATIONSHIP_TYPE = "relationship"

_DELIMITER_PATTERN = re.compile("|".join(re.escape(d) for d in TUPLE_DELIMITERS))
_SEPARATOR_PATTERN = re.compile("|".join(re.escape(s) for s in RECORD_SEPARATORS) + r"|\n")
_INTEGER_PATTERN = re.compile(r"^[+-]?\d+$")
_FIELD_NOISE = " \t\r\n'\""
_RECORD_NOISE = " \t\r\n'\"()"
# How many line numbers of malformed records are quoted in the log.
_LOGGED_LINE_NUMBERS = 5

SamplingHyper = Tuple[int, int, int, int]


def canonical_name(name: str) -> str:
    """Return the lookup key of a class name: case folded, white space runs made one space."""
    return " ".join(name.split()).casefold()


def validate_sampling_hyper(hyper: Sequence[Any]) -> SamplingHyper:
    """Check ``[neg_low, neg_high, pos_low, pos_high]`` (config DATASETS.SKYSA.SAMPLING_HYPER).

    Returns:
        The four bounds as a tuple of int.

    Raises:
        ValueError: not four integers in 1..10, or a low bound above its high bound.
    """
    values = list(hyper)
    if len(values) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"SAMPLING_HYPER must be four integers [neg_low, neg_high, pos_low, pos_high], "
            f"got {values!r}"
        )
    if not all(MIN_SCORE <= v <= MAX_SCORE for v in values):
        raise ValueError(f"SAMPLING_HYPER values must lie in 1..10, got {values}")
    if values[0] > values[1] or values[2] > values[3]:
        raise ValueError(
            f"SAMPLING_HYPER needs neg_low <= neg_high and pos_low <= pos_high, got {values}"
        )
    return tuple(values)  # type: ignore[return-value]


class VisualRelevanceGraph:
    """Directed graph of class names whose edges carry a visual-relevance score (1..10).

    Args:
        edges: ``{(source, target): score}``.
        source: where the edges came from (a file name), used in messages.
    """

    def __init__(self, edges: Dict[Tuple[str, str], int], *, source: str = "<memory>"):
        self.source = source
        self._display: Dict[str, str] = {}
        self._outgoing: Dict[str, Dict[str, int]] = {}
        self._incoming: Dict[str, Dict[str, int]] = {}
        self._neighbour_cache: Dict[Tuple[str, int, int, bool], FrozenSet[str]] = {}
        for (source_name, target_name), score in edges.items():
            source_key = self._add_node(source_name)
            target_key = self._add_node(target_name)
            self._outgoing.setdefault(source_key, {})[target_key] = int(score)
            self._incoming.setdefault(target_key, {})[source_key] = int(score)
        self._nodes = tuple(sorted(self._display.values(), key=lambda n: (n.casefold(), n)))

    def _add_node(self, name: str) -> str:
        key = canonical_name(name)
        self._display.setdefault(key, " ".join(name.split()))
        return key

    @property
    def nodes(self) -> Tuple[str, ...]:
        """Every class name that appears in an edge, sorted ignoring case."""
        return self._nodes

    @property
    def num_edges(self) -> int:
        return sum(len(targets) for targets in self._outgoing.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._display

    def __repr__(self) -> str:
        return (
            f"VisualRelevanceGraph({len(self)} nodes, {self.num_edges} edges, "
            f"source={self.source!r})"
        )

    def score(self, source: str, target: str) -> Optional[int]:
        """Return the score of the edge ``source -> target``, or None when there is none."""
        return self._outgoing.get(canonical_name(source), {}).get(canonical_name(target))

    def _neighbours(self, name: str, low: int, high: int, incoming: bool) -> FrozenSet[str]:
        key = (canonical_name(name), low, high, incoming)
        cached = self._neighbour_cache.get(key)
        if cached is None:
            table = self._incoming if incoming else self._outgoing
            cached = frozenset(
                self._display[other]
                for other, score in table.get(key[0], {}).items()
                if low <= score <= high
            )
            self._neighbour_cache[key] = cached
        return cached

    def negatives(self, name: str, hyper: Sequence[int]) -> FrozenSet[str]:
        """Return the targets of ``name`` scored in [neg_low, neg_high] (empty if absent).

        Args:
            name: a class name.
            hyper: ``[neg_low, neg_high, pos_low, pos_high]``, see validate_sampling_hyper.
        """
        neg_low, neg_high, _, _ = validate_sampling_hyper(hyper)
        return self._neighbours(name, neg_low, neg_high, incoming=False)

    def positives(
        self, name: str, hyper: Sequence[int], *, incoming: bool = False
    ) -> FrozenSet[str]:
        """Return the targets of ``name`` scored in [pos_low, pos_high] (empty if absent).

        Args:
            name: a class name.
            hyper: ``[neg_low, neg_high, pos_low, pos_high]``, see validate_sampling_hyper.
            incoming: return the sources whose edge to ``name`` is in that range instead.
        """
        _, _, pos_low, pos_high = validate_sampling_hyper(hyper)
        return self._neighbours(name, pos_low, pos_high, incoming=incoming)


@dataclasses.dataclass
class GraphParseReport:
    """Counts gathered while parsing a graph file."""

    lines: int = 0
    relationships: int = 0
    skipped_records: int = 0
    duplicates: int = 0
    changed_duplicates: int = 0
    malformed: int = 0
    malformed_line_numbers: List[int] = dataclasses.field(default_factory=list)


def _strings_in_json(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in _strings_in_json(item)]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings_in_json(item)]
    return []


def _records_in_line(line: str) -> List[str]:
    """Split one line of the file into record texts (see the module docstring)."""
    texts = [line]
    stripped = line.strip()
    if stripped[:1] in ('"', "[", "{"):
        try:
            texts = _strings_in_json(json.loads(stripped))
        except json.JSONDecodeError:
            texts = [line]
    records = []
    for text in texts:
        for marker in COMPLETION_MARKERS:
            text = text.replace(marker, "\n")
        records.extend(piece for piece in _SEPARATOR_PATTERN.split(text) if piece.strip())
    return records


def _parse_relationship(record: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """Return ``(source, target, score_text)`` of a relationship record, None for other types.

    ``score_text`` is None when the record has fewer than four fields.
    """
    fields = [f.strip(_FIELD_NOISE) for f in _DELIMITER_PATTERN.split(record.strip(_RECORD_NOISE))]
    if fields[0].casefold() != RELATIONSHIP_TYPE:
        return None
    if len(fields) < 4:
        return ("", "", None)
    # The score is a bare number, so stray parentheses around it are noise as well.
    return fields[1], fields[2], fields[3].strip(_RECORD_NOISE)


def parse_graph_lines(
    lines: Iterable[str], *, source: str = "<memory>"
) -> Tuple[VisualRelevanceGraph, GraphParseReport]:
    """Parse the lines of a ``skysa_graph.jsonl`` file (rules in the module docstring).

    Args:
        lines: the file's lines.
        source: the file name, used in messages.

    Returns:
        The graph and the parse counts.

    Raises:
        ValueError: a score outside 1..10 (naming the line), or no valid relationship.
    """
    report = GraphParseReport()
    # Keyed by the canonical (source, target) pair; the value keeps the first spelling.
    edges: Dict[Tuple[str, str], Tuple[str, str, int]] = {}
    for line_number, line in enumerate(lines, start=1):
        report.lines = line_number
        for record in _records_in_line(line):
            parsed = _parse_relationship(record)
            if parsed is None:
                report.skipped_records += 1
                continue
            source_name, target_name, score_text = parsed
            if not source_name or not target_name or score_text is None:
                _count_malformed(report, line_number)
                continue
            if not _INTEGER_PATTERN.match(score_text):
                _count_malformed(report, line_number)
                continue
            score = int(score_text)
            if not MIN_SCORE <= score <= MAX_SCORE:
                raise ValueError(
                    f"{source}, line {line_number}: score {score} of {source_name!r} -> "
                    f"{target_name!r} is outside {MIN_SCORE}..{MAX_SCORE}"
                )
            _add_edge(edges, report, source_name, target_name, score)
    if not edges:
        raise ValueError(
            f"{source} contains no valid relationship record ({report.lines} lines, "
            f"{report.malformed} malformed relationship records); expected lines like "
            '("relationship"{tuple_delimiter}"<source>"{tuple_delimiter}"<target>"'
            '{tuple_delimiter}"<score 1-10>")'
        )
    spelled = {(s, t): score for s, t, score in edges.values()}
    return VisualRelevanceGraph(spelled, source=source), report


def _count_malformed(report: GraphParseReport, line_number: int) -> None:
    report.malformed += 1
    if len(report.malformed_line_numbers) < _LOGGED_LINE_NUMBERS:
        report.malformed_line_numbers.append(line_number)


def _add_edge(
    edges: Dict[Tuple[str, str], Tuple[str, str, int]],
    report: GraphParseReport,
    source_name: str,
    target_name: str,
    score: int,
) -> None:
    """Store one edge; a repeated pair keeps its first spelling and takes the new score."""
    pair = (canonical_name(source_name), canonical_name(target_name))
    report.relationships += 1
    previous = edges.get(pair)
    if previous is None:
        edges[pair] = (source_name, target_name, score)
        return
    report.duplicates += 1
    report.changed_duplicates += int(previous[2] != score)
    edges[pair] = (previous[0], previous[1], score)


def _log_report(report: GraphParseReport, graph: VisualRelevanceGraph) -> None:
    logger.info(
        "Loaded the visual-relevance graph %s: %d nodes, %d edges from %d lines.",
        graph.source,
        len(graph),
        graph.num_edges,
        report.lines,
    )
    if report.malformed:
        logger.warning(
            "%s: skipped %d malformed relationship records (first at lines %s); each needs a "
            "source, a target and an integer score.",
            graph.source,
            report.malformed,
            ", ".join(str(n) for n in report.malformed_line_numbers),
        )
    if report.duplicates:
        logger.warning(
            "%s: %d relationship records repeat an earlier (source, target) pair, %d of them "
            "with a different score; the last score of each pair is kept.",
            graph.source,
            report.duplicates,
            report.changed_duplicates,
        )


@functools.lru_cache(maxsize=8)
def _load_graph_cached(resolved_path: str, mtime_ns: int, size: int) -> VisualRelevanceGraph:
    # mtime_ns and size are part of the cache key, so an edited file is parsed again.
    with open(resolved_path, encoding="utf-8") as f:
        graph, report = parse_graph_lines(f, source=resolved_path)
    _log_report(report, graph)
    return graph


def load_graph(path: Union[str, Path]) -> VisualRelevanceGraph:
    """Load a ``skysa_graph.jsonl`` file, parsed once per process while the file is unchanged.

    Args:
        path: the graph file.

    Returns:
        The parsed graph (shared between callers: treat it as read-only).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, contains no valid relationship, or has a score outside
            1..10.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"Visual-relevance graph not found: {resolved} (config key "
            "DATASETS.SKYSA.GRAPH_FILE or the dataset's graph_file metadata)"
        )
    stat = resolved.stat()
    return _load_graph_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def resolve_graph_file(dataset_name: str, configured: str = "") -> str:
    """Return the graph file that serves a training dataset, or "" when it has none.

    ``configured`` (config DATASETS.SKYSA.GRAPH_FILE) wins when set. Otherwise the dataset's
    ``graph_file`` metadata is used, which for Sky-SA datasets is the folder's
    ``skysa_graph.jsonl`` when that file exists. The training mapper and the losses both
    resolve the graph this way, so they agree on it.
    """
    if configured:
        return configured
    return MetadataCatalog.get(dataset_name).get("graph_file", "") or ""
