#!/usr/bin/env python
"""Convert colour-coded (or differently numbered) label maps to this project's index PNGs.

Output: single-channel uint8 PNGs where value k is class k of the benchmark's class list and
255 is ignore. A conversion table maps each source colour (``"rgb"`` mode) or each source
value (``"index"`` mode) to an output value. Every colour or value missing from the table
becomes the ignore value. The script counts those pixels per file and reports them at the
end, so a wrong table shows up at once.

Built-in tables live in the class lists (``datasets/class_lists/<benchmark>.json``, key
``label_encodings``). ``--table potsdam`` takes a benchmark's first table, and
``--table potsdam:mmseg`` a named one. List them with ``--list-tables``:

* ISPRS Potsdam and Vaihingen: ``isprs_rgb`` (the colour labels; black, the eroded boundary of
  the noBoundary reference, becomes 255) and ``mmseg`` (index labels written by
  mmsegmentation's converters, 0 = boundary and class k stored as k + 1).
* UAVid: ``uavid_rgb``, the UAVid toolkit's colours.
* FloodNet: its ``*_lab.png`` masks are already single-channel index PNGs in the class-list
  order, so no conversion is needed; ``floodnet`` only checks the values (0-9) and rewrites them.
* OpenEarthMap: its labels are single-band GeoTIFFs holding indices 0-8 in the class-list
  order; ``oem`` writes them as PNG and turns any other value into 255.
* LoveDA: ``loveda`` (0 = no-data becomes 255, class k stored as k + 1 moves down by one).
* SAMRS: ``samrs`` (255 = background becomes class 0, and every class moves up by one).
* iSAID: ``semantic_rgb`` for the semantic colour masks (see also tools/prepare_isaid.py).

A user table is a JSON file in the same format::

    {"mode": "rgb", "table": {"#3C1098": 0, "110,193,228": 2, "#9B9B9B": 255}}
    {"mode": "index", "table": {"0": 255, "1": 0, "2": 1}}

Colours are written "#RRGGBB" or "R,G,B". An optional "ignore_value" (default 255) sets the
value of unknown colours.

Example (ISPRS Potsdam colour labels)::

    python tools/convert_rgb_labels.py --table potsdam --binarize 128 \\
        --input raw/5_Labels_all_noBoundary --pattern '*.tif' --output raw/labels_index
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# A sibling script: Python puts this folder on sys.path when a script here is run.
from crop_tiles import add_common_arguments, find_files, start_command_line, write_png

logger = logging.getLogger(__name__)

CLASS_LISTS_DIR = Path(__file__).resolve().parents[1] / "datasets" / "class_lists"
MODES = ("rgb", "index")
DEFAULT_IGNORE_VALUE = 255
# How many unknown colours or values a report names before it gives only a count.
_SHOWN_UNKNOWN = 5


@dataclass(frozen=True)
class LabelTable:
    """A conversion table: source colour or value -> output value.

    ``mapping`` keys are 0xRRGGBB integers in "rgb" mode and source values in "index" mode.
    """

    name: str
    mode: str
    mapping: Dict[int, int]
    ignore_value: int = DEFAULT_IGNORE_VALUE


@dataclass
class ConversionReport:
    """Counts of one conversion run; ``unknown`` maps a colour or value to its pixel count."""

    files: int = 0
    pixels: int = 0
    unknown: Counter = field(default_factory=Counter)
    files_with_unknown: List[str] = field(default_factory=list)

    @property
    def unknown_pixels(self) -> int:
        """Number of pixels whose colour or value is missing from the table."""
        return sum(self.unknown.values())


def parse_color(text: str) -> int:
    """Parse "#RRGGBB" or "R,G,B" into a 0xRRGGBB integer.

    Raises:
        ValueError: the text is neither form, or a channel lies outside 0-255.
    """
    text = text.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return int(text[1:], 16)
        channels = [int(part) for part in text.split(",")]
    except ValueError as e:
        raise ValueError(f"colour {text!r} is neither '#RRGGBB' nor 'R,G,B'.") from e
    if len(channels) != 3 or not all(0 <= c <= 255 for c in channels):
        raise ValueError(f"colour {text!r} must have three channels in 0-255.")
    return (channels[0] << 16) | (channels[1] << 8) | channels[2]


def format_key(key: int, mode: str) -> str:
    """Write a table key back as "#RRGGBB" (rgb mode) or as a number (index mode)."""
    return f"#{key:06X}" if mode == "rgb" else str(key)


def table_from_json(data: object, name: str) -> LabelTable:
    """Build a :class:`LabelTable` from its JSON form (see the module docstring).

    Raises:
        ValueError: a field is missing or invalid; the message names ``name``.
    """
    if not isinstance(data, dict) or data.get("mode") not in MODES:
        raise ValueError(f"table {name}: expected an object with 'mode' in {MODES}.")
    mode, entries = data["mode"], data.get("table")
    ignore_value = data.get("ignore_value", DEFAULT_IGNORE_VALUE)
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"table {name}: 'table' must be a non-empty object.")
    mapping: Dict[int, int] = {}
    for source, value in entries.items():
        try:
            key = parse_color(source) if mode == "rgb" else int(source)
        except ValueError as e:
            raise ValueError(f"table {name}: invalid source {source!r}: {e}") from e
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise ValueError(f"table {name}: output value of {source!r} must be in 0-255.")
        if key in mapping:
            raise ValueError(f"table {name}: {source!r} appears twice.")
        mapping[key] = value
    if not isinstance(ignore_value, int) or not 0 <= ignore_value <= 255:
        raise ValueError(f"table {name}: 'ignore_value' must be in 0-255, got {ignore_value!r}.")
    return LabelTable(name=name, mode=mode, mapping=mapping, ignore_value=ignore_value)


def builtin_tables(class_lists_dir: Path = CLASS_LISTS_DIR) -> Dict[str, Dict[str, dict]]:
    """Return ``{benchmark: {table name: table JSON}}`` from the class lists."""
    tables = {}
    for path in sorted(class_lists_dir.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            encodings = json.load(f).get("label_encodings") or {}
        if encodings:
            tables[path.stem] = encodings
    return tables


def load_table(spec: str, class_lists_dir: Path = CLASS_LISTS_DIR) -> LabelTable:
    """Load a table: a JSON file path, ``<benchmark>`` or ``<benchmark>:<table name>``.

    Raises:
        FileNotFoundError: ``spec`` names a JSON file that does not exist.
        KeyError: no built-in table has that name; the message lists the known ones.
    """
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"Table file {path} not found.")
        with open(path, encoding="utf-8") as f:
            return table_from_json(json.load(f), str(path))
    benchmark, _, table_name = spec.partition(":")
    tables = builtin_tables(class_lists_dir)
    known = [f"{b}:{t}" for b, entries in tables.items() for t in entries]
    encodings = tables.get(benchmark, {})
    if not table_name and encodings:
        table_name = next(iter(encodings))
    if table_name not in encodings:
        raise KeyError(f"No built-in table {spec!r}; known tables: {', '.join(known)}.")
    return table_from_json(encodings[table_name], f"{benchmark}:{table_name}")


def _binarize(rgb: np.ndarray, threshold: int, table: LabelTable) -> np.ndarray:
    pure = {0x00, 0xFF}
    channels = [(key >> shift) & 0xFF for key in table.mapping for shift in (16, 8, 0)]
    if not set(channels) <= pure:
        raise ValueError(
            f"--binarize needs a table whose colours use only 0 and 255 per channel; "
            f"{table.name} does not."
        )
    return np.where(rgb >= threshold, 255, 0).astype(np.uint8)


def _convert_rgb(
    label: np.ndarray, table: LabelTable, binarize: Optional[int]
) -> Tuple[np.ndarray, Counter]:
    rgb = label[..., :3].astype(np.uint8)
    if binarize is not None:
        rgb = _binarize(rgb, binarize, table)
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(keys.shape, table.ignore_value, dtype=np.uint8)
    matched = np.zeros(keys.shape, dtype=bool)
    for key, value in table.mapping.items():
        hit = keys == key
        out[hit] = value
        matched |= hit
    colours, counts = np.unique(keys[~matched], return_counts=True)
    return out, Counter({format_key(int(c), "rgb"): int(n) for c, n in zip(colours, counts)})


def _convert_index(label: np.ndarray, table: LabelTable) -> Tuple[np.ndarray, Counter]:
    values = label.astype(np.int64)
    if values.size and values.min() < 0:
        raise ValueError("index labels must not hold negative values.")
    size = max(int(values.max(initial=0)), max(table.mapping)) + 1
    lookup = np.full(size, table.ignore_value, dtype=np.uint8)
    known = np.zeros(size, dtype=bool)
    for source, value in table.mapping.items():
        if source >= 0:
            lookup[source] = value
            known[source] = True
    unknown_values, counts = np.unique(values[~known[values]], return_counts=True)
    return lookup[values], Counter({int(v): int(n) for v, n in zip(unknown_values, counts)})


def convert_label(
    label: np.ndarray, table: LabelTable, *, binarize: Optional[int] = None
) -> Tuple[np.ndarray, Counter]:
    """Convert one label map.

    Args:
        label: H x W x 3 (or 4, alpha dropped) colours for an "rgb" table; H x W values for an
            "index" table.
        table: the conversion table.
        binarize: "rgb" only: set each channel to 255 if it is at least this value, else 0,
            before the lookup (for ISPRS labels with blended colours along some edges).

    Returns:
        The H x W uint8 index map, and the pixel count of each colour or value missing from
        the table (colours as "#RRGGBB").

    Raises:
        ValueError: the label's channels do not fit the table's mode.
    """
    if table.mode == "rgb":
        if label.ndim != 3 or label.shape[2] < 3:
            raise ValueError(
                f"table {table.name} maps colours, but the label has shape {label.shape}: it "
                "looks like an index label already, so use an 'index' table for it."
            )
        return _convert_rgb(label, table, binarize)
    if label.ndim != 2:
        raise ValueError(
            f"table {table.name} maps index values, but the label has shape {label.shape}: it "
            "looks like a colour label, so use an 'rgb' table for it."
        )
    return _convert_index(label, table)


def read_label_array(path: Path, mode: str) -> np.ndarray:
    """Read a label file: colours for "rgb" tables, raw values (palette indices) otherwise."""
    with Image.open(path) as image:
        if mode == "rgb" and image.mode == "P":
            image = image.convert("RGB")
        return np.asarray(image)


def convert_files(
    files: Dict[str, Path], output_dir: Path, table: LabelTable, *, binarize: Optional[int] = None
) -> ConversionReport:
    """Convert ``{output stem: label file}`` into ``output_dir/<stem>.png``.

    Returns:
        Per-run counts, with the unknown colours or values of all files.
    """
    report = ConversionReport()
    for stem, path in sorted(files.items()):
        label = read_label_array(path, table.mode)
        index_map, unknown = convert_label(label, table, binarize=binarize)
        write_png(index_map, output_dir / f"{stem}.png")
        report.files += 1
        report.pixels += index_map.size
        if unknown:
            report.unknown.update(unknown)
            report.files_with_unknown.append(stem)
            logger.warning(
                "%s: %d pixels of unknown colours or values set to %d.",
                path, sum(unknown.values()), table.ignore_value,
            )
    return report


def format_report(report: ConversionReport, table: LabelTable, output_dir: Path) -> str:
    """Describe a run in a few lines for the command line."""
    lines = [f"Converted {report.files} label files with table {table.name} into {output_dir}."]
    if report.unknown_pixels:
        share = 100.0 * report.unknown_pixels / max(report.pixels, 1)
        common = ", ".join(
            f"{key} ({count} px)" for key, count in report.unknown.most_common(_SHOWN_UNKNOWN)
        )
        lines.append(
            f"{report.unknown_pixels} pixels ({share:.3f}%) in {len(report.files_with_unknown)} "
            f"files had colours or values outside the table and were set to "
            f"{table.ignore_value}; most frequent: {common}."
        )
    else:
        lines.append("Every pixel matched the table.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--table", help="built-in table (<benchmark> or <benchmark>:<name>) or a JSON file")
    add("--list-tables", action="store_true", help="print the built-in tables and exit")
    add("--input", type=Path, help="folder of label files")
    add("--output", type=Path, help="folder for the index PNGs")
    add("--pattern", default="*.png", help="glob below --input (default: *.png)")
    add("--strip-suffix", default="", help="text cut from the end of output stems")
    add("--path-names", action="store_true", help="name outputs by their path below --input")
    add("--drop-dirs", default="", help="with --path-names: folder names left out (comma list)")
    add("--binarize", type=int, help="rgb tables: threshold each channel to 0/255 first")
    add_common_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start_command_line(args)
    try:
        if args.list_tables:
            for benchmark, entries in builtin_tables().items():
                for name, entry in entries.items():
                    print(f"{benchmark}:{name} ({entry['mode']}): {entry.get('description', '')}")
            return 0
        if not (args.table and args.input and args.output):
            raise ValueError("--table, --input and --output are required.")
        table = load_table(args.table)
        drop_dirs = tuple(d for d in args.drop_dirs.split(",") if d)
        files = find_files(
            args.input,
            args.pattern,
            path_names=args.path_names,
            drop_dirs=drop_dirs,
            strip_suffix=args.strip_suffix,
        )
        report = convert_files(files, args.output, table, binarize=args.binarize)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, table, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
