#!/usr/bin/env python3
"""Convert a folder dataset (images/, labels/, classes.json) into the Sky-SA training format.

Input: the folder layout of ``skysense_o.data.datasets.register_folder`` (index PNG labels,
``classes.json`` with ``classes`` and ``ignore_index``). Output folder:

```
OUT/
  img_dir/              the images, copied byte for byte
  ann_dir/<stem>.png    labels remapped to each image's own class list, 255 = ignore
  skysa_dataset.jsonl   {"flickr_url": "img_dir/...", "segmentation": "ann_dir/...",
                         "ann_list": [{"category_name": ...}, ...]} per image
  skysa_graph.jsonl     a copy of --graph, when given (checked first)
```

The ``ann_list`` of an image lists the classes present in its label, in the order of
``classes.json``. Label value k of the output means ``ann_list[k]``. The source's ignore value
becomes 255. Images whose label has no class pixel are left out and reported. Reading the
output back with ``register_skysa_folder`` gives every pixel the class name it had.

Usage:

    python tools/convert_folder_to_skysa.py SOURCE OUT [--graph GRAPH] \
        [--include STEM ...] [--exclude STEM ...] [--dry-run] [--overwrite]

Then register OUT with ``skysense_o.data.datasets.register_skysa_folder(name, OUT)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from skysense_o.data.datasets.register_folder import (
    FolderClasses,
    list_folder_items,
    read_classes_json,
)
from skysense_o.data.datasets.register_skysa import GRAPH_JSONL, IGNORE_LABEL, TRAIN_JSONL
from skysense_o.data.graph import load_graph
from skysense_o.utils.image_io import read_image_size, read_label

logger = logging.getLogger("convert_folder_to_skysa")

IMAGE_DIRNAME = "img_dir"
LABEL_DIRNAME = "ann_dir"
# The output label PNG is uint8 and 255 is ignore, so an image may have at most 255 classes.
MAX_CLASSES_PER_IMAGE = IGNORE_LABEL


@dataclasses.dataclass
class ImagePlan:
    """One image to convert: its files and the class indices (ascending) its label contains."""

    stem: str
    image_path: Path
    label_path: Path
    present: List[int]


@dataclasses.dataclass
class ConversionPlan:
    """Everything read from one source folder before anything is written."""

    source: Path
    classes: FolderClasses
    images: List[ImagePlan]
    empty_stems: List[str]


def _present_classes(label: np.ndarray, classes: FolderClasses, label_path: Path) -> List[int]:
    """Return the class indices present in ``label`` after checking every value."""
    values = np.unique(label)
    values = values[values != classes.ignore_index]
    invalid = values[(values < 0) | (values >= len(classes.classes))]
    if invalid.size:
        raise ValueError(
            f"{label_path} contains values {invalid[:5].tolist()} that are neither a class index "
            f"(0..{len(classes.classes) - 1}) nor the ignore value {classes.ignore_index}"
        )
    if values.size > MAX_CLASSES_PER_IMAGE:
        raise ValueError(f"{label_path} contains {values.size} classes; at most 255 fit Sky-SA")
    return [int(v) for v in values]


def plan_conversion(
    source: Path,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> ConversionPlan:
    """Read and check a folder dataset and decide what to write.

    Args:
        source: the folder dataset.
        include: keep only these stems.
        exclude: drop these stems.

    Raises:
        FileNotFoundError, ValueError: a missing or invalid file, an unknown stem, or an image
            whose label has another size.
    """
    source = Path(source)
    classes = read_classes_json(source)
    items = list_folder_items(source, stems=include)
    if exclude:
        unknown = sorted(set(exclude) - {stem for stem, _, _ in items})
        if unknown:
            raise ValueError(f"--exclude names stems that {source} does not have: {unknown}")
        items = [item for item in items if item[0] not in set(exclude)]

    images, empty = [], []
    for stem, image_path, label_path in items:
        label = read_label(label_path)
        width, height = read_image_size(image_path)
        if label.shape != (height, width):
            raise ValueError(
                f"Image {image_path} is {width} x {height} but its label {label_path} is "
                f"{label.shape[1]} x {label.shape[0]} (width x height)"
            )
        present = _present_classes(label, classes, label_path)
        if present:
            images.append(ImagePlan(stem, image_path, label_path, present))
        else:
            empty.append(stem)
    return ConversionPlan(source=source, classes=classes, images=images, empty_stems=empty)


def _check_output_names(plans: Sequence[ConversionPlan]) -> None:
    seen: Dict[str, Path] = {}
    for plan in plans:
        for item in plan.images:
            for name in (item.image_path.name, item.stem):
                if name in seen:
                    raise ValueError(
                        f"{item.image_path} and {seen[name]} would share the output name "
                        f"{name!r}; rename one or exclude it."
                    )
                seen[name] = item.image_path


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; remove earlier conversion outputs only when ``overwrite`` is set."""
    outputs = [out_dir / IMAGE_DIRNAME, out_dir / LABEL_DIRNAME, out_dir / TRAIN_JSONL]
    outputs.append(out_dir / GRAPH_JSONL)
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already contains {[p.name for p in existing]}; pass --overwrite to "
            "replace them or choose another output folder."
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (out_dir / IMAGE_DIRNAME).mkdir(parents=True)
    (out_dir / LABEL_DIRNAME).mkdir(parents=True)


def _write_image(plan: ConversionPlan, item: ImagePlan, out_dir: Path) -> dict:
    """Copy one image, write its remapped label and return its jsonl record."""
    label = read_label(item.label_path)
    lookup = np.full(int(label.max()) + 1, IGNORE_LABEL, dtype=np.uint8)
    for new_value, class_index in enumerate(item.present):
        lookup[class_index] = new_value
    image_name = f"{IMAGE_DIRNAME}/{item.image_path.name}"
    label_name = f"{LABEL_DIRNAME}/{item.stem}.png"
    shutil.copyfile(item.image_path, out_dir / image_name)
    Image.fromarray(lookup[label], mode="L").save(out_dir / label_name)
    return {
        "flickr_url": image_name,
        "segmentation": label_name,
        "ann_list": [{"category_name": plan.classes.classes[k]} for k in item.present],
    }


def write_skysa(
    plans: Sequence[ConversionPlan],
    out_dir: Path,
    *,
    graph: Optional[Path] = None,
    overwrite: bool = False,
) -> List[dict]:
    """Write one Sky-SA folder from one or more planned source folders.

    Args:
        plans: from :func:`plan_conversion`; their images must have distinct names.
        out_dir: the Sky-SA folder to write.
        graph: a visual-relevance graph to check and copy in, or None.
        overwrite: replace an earlier conversion in ``out_dir``.

    Returns:
        The jsonl records written, in order.
    """
    out_dir = Path(out_dir)
    _check_output_names(plans)
    if graph is not None:
        load_graph(graph)
    _prepare_output(out_dir, overwrite)

    records = [_write_image(plan, item, out_dir) for plan in plans for item in plan.images]
    with open(out_dir / TRAIN_JSONL, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if graph is not None:
        shutil.copyfile(graph, out_dir / GRAPH_JSONL)
    return records


def summarize(plans: Iterable[ConversionPlan], graph: Optional[Path] = None) -> str:
    """Describe planned conversions: image counts and, per class, how many images contain it."""
    lines = []
    graph_nodes = load_graph(graph) if graph is not None else None
    for plan in plans:
        lines.append(
            f"{plan.source}: {len(plan.images)} images to convert, "
            f"{len(plan.empty_stems)} without any class pixel left out {plan.empty_stems}"
        )
        for index, name in enumerate(plan.classes.classes):
            count = sum(index in item.present for item in plan.images)
            in_graph = ""
            if graph_nodes is not None:
                in_graph = ", in the graph" if name in graph_nodes else ", not in the graph"
            lines.append(f"  {name}: {count} images{in_graph}")
    return "\n".join(lines)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with images/, labels/, classes.json")
    parser.add_argument("output", type=Path, help="Sky-SA folder to write")
    parser.add_argument("--graph", type=Path, help="skysa_graph.jsonl to check and copy in")
    parser.add_argument("--include", nargs="+", metavar="STEM", help="convert only these stems")
    parser.add_argument("--exclude", nargs="+", metavar="STEM", help="leave out these stems")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the input and print a summary only"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier conversion in OUTPUT"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = plan_conversion(args.source, include=args.include, exclude=args.exclude)
        print(summarize([plan], graph=args.graph))
        if args.dry_run:
            print("Dry run: nothing written.")
            return 0
        records = write_skysa([plan], args.output, graph=args.graph, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {len(records)} images to {args.output / TRAIN_JSONL}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
