"""Register the remote-sensing segmentation benchmarks in Detectron2's catalogs.

Ten benchmarks (iSAID, SAMRS-SOTA, SAMRS-SIOR, SAMRS-FAST, ISPRS Potsdam, ISPRS Vaihingen,
OpenEarthMap, LoveDA, FloodNet, UAVid) and the Dubai aerial sample set. Each gets:

* ``<benchmark>_test``: the split the benchmark is scored on, with this project's class names.
  Where a benchmark withholds its test labels (iSAID, SAMRS, OpenEarthMap, LoveDA, UAVid), this
  is its labelled validation split.
* ``<benchmark>_val``: only for FloodNet, whose validation split is labelled and separate.
* ``<benchmark>_<split>_release`` (not for Dubai): the same images and labels, scored with the
  SkySense-O release's class names ("others" for the catch-all class), for comparison with its
  published numbers. Only the names change: each release name is placed at the label value of
  the class it means, and unlabelled pixels (255) stay ignored. The release set its ignore
  value to 65535, which no 8-bit label holds, so it ignored no pixel.
  NOTE: the release's prepared label files are not public, so this protocol matches its class
  names, not necessarily its tiling or its treatment of unlabelled pixels.

Names are registered at import. Nothing is read then: the dataset root comes from
``$DETECTRON2_DATASETS`` (default ``datasets``) when a dataset is loaded, and the class list
(``datasets/class_lists/<benchmark>.json`` in the repository) when its metadata is first read.
The folder tree, the preparation commands and the class-list format are in datasets/README.md.

Metadata: ``stuff_classes``, ``ignore_label``, ``evaluator_type`` ("skysense_sem_seg"),
``class_list_file``, ``benchmark``, ``protocol`` ("default" or "release"), and, where known,
``stuff_colors``, ``background_class`` (index of the catch-all class) and ``synonyms`` (one list
of extra names per class, aligned with ``stuff_classes``, for retrieval augmentation).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog

from .register_skysa import (
    DATASETS_ENV,
    DEFAULT_DATASETS_ROOT,
    EVALUATOR_TYPE,
    datasets_root,
    register_dataset,
)

logger = logging.getLogger(__name__)

# The class lists ship with the repository, beside the dataset README. This package sits at
# <repo>/skysense_o/data/datasets/, three levels below the repository root.
CLASS_LISTS_DIR = Path(__file__).resolve().parents[3] / "datasets" / "class_lists"
DATASETS_README = "datasets/README.md"
# Image suffixes accepted beside the label PNGs (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIX = ".png"
PROTOCOL_DEFAULT = "default"
PROTOCOL_RELEASE = "release"
RELEASE_SUFFIX = "_release"
# Metadata keys computed from the class list on first access.
CLASS_LIST_KEYS = ("stuff_classes", "ignore_label", "stuff_colors", "background_class", "synonyms")
# How many file names an error lists before it gives only a count.
_SHOWN_FILES = 5


@dataclass(frozen=True)
class BenchmarkSplit:
    """Image and label folders of one registered split, relative to the dataset root."""

    split: str
    image_dir: str
    label_dir: str


def _mmseg_split(folder: str, split: str, source_split: Optional[str] = None) -> BenchmarkSplit:
    """Return the ``<folder>/img_dir/<source>`` + ``<folder>/ann_dir/<source>`` layout."""
    source = source_split or split
    return BenchmarkSplit(split, f"{folder}/img_dir/{source}", f"{folder}/ann_dir/{source}")


# USER: to add a benchmark, add its splits here and its class list to datasets/class_lists/.
BENCHMARK_SPLITS: Dict[str, Tuple[BenchmarkSplit, ...]] = {
    "isaid": (_mmseg_split("isaid", "test", "val"),),
    "samrs_sota": (_mmseg_split("samrs_sota", "test", "val"),),
    "samrs_sior": (_mmseg_split("samrs_sior", "test", "val"),),
    "samrs_fast": (_mmseg_split("samrs_fast", "test", "val"),),
    "potsdam": (_mmseg_split("potsdam", "test"),),
    "vaihingen": (_mmseg_split("vaihingen", "test"),),
    "openearthmap": (_mmseg_split("openearthmap", "test", "val"),),
    "loveda": (_mmseg_split("loveda", "test", "val"),),
    "floodnet": (_mmseg_split("floodnet", "test"), _mmseg_split("floodnet", "val")),
    "uavid": (_mmseg_split("uavid", "test", "val"),),
    # The sample set keeps the flat images/ + labels/ layout of its source folder.
    "dubai_aerial": (BenchmarkSplit("test", "dubai_aerial/images", "dubai_aerial/labels"),),
}
# Benchmarks whose class list has a "release" section, so that a *_release name is registered.
# Kept here because registration must not read the class lists.
RELEASE_BENCHMARKS = tuple(name for name in BENCHMARK_SPLITS if name != "dubai_aerial")


@dataclass(frozen=True)
class ClassList:
    """One benchmark's class list, checked, in the label order of its prepared labels.

    ``release_classes`` holds the release's names placed at the label value of the class each
    one means (None without a release list). ``synonyms`` has one tuple per class (None
    without a synonym file). ``colors`` are RGB display colours (None when unknown).
    """

    benchmark: str
    path: Path
    classes: Tuple[str, ...]
    ignore_label: int
    background_class: Optional[int]
    colors: Optional[Tuple[Tuple[int, int, int], ...]]
    release_classes: Optional[Tuple[str, ...]]
    synonyms: Optional[Tuple[Tuple[str, ...], ...]]


def _read_json(path: Path, description: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{description} {path} not found.") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{description} {path} is not valid JSON: {e}") from e


def _check_names(values: Any, field: str, path: Path) -> Tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{path}: '{field}' must be a non-empty list of names, got {values!r}.")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{path}: every entry of '{field}' must be a non-empty string.")
    if len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{path}: '{field}' repeats {repeated}.")
    return tuple(values)


def _check_colors(
    colors: Any, num_classes: int, path: Path
) -> Optional[Tuple[Tuple[int, ...], ...]]:
    if colors is None:
        return None
    valid = (
        isinstance(colors, list)
        and len(colors) == num_classes
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(x, int) and 0 <= x <= 255 for x in c)
            for c in colors
        )
    )
    if not valid:
        raise ValueError(
            f"{path}: 'colors' must be null or {num_classes} [R, G, B] lists of integers 0-255."
        )
    return tuple(tuple(c) for c in colors)


def _release_in_label_order(release: Any, num_classes: int, path: Path) -> Tuple[str, ...]:
    """Place each release name at the label value given by ``release["label_values"]``."""
    if not isinstance(release, dict):
        raise ValueError(f"{path}: 'release' must be null or an object, got {release!r}.")
    names = _check_names(release.get("classes"), "release.classes", path)
    values = release.get("label_values")
    if not isinstance(values, list) or sorted(values) != list(range(num_classes)):
        raise ValueError(
            f"{path}: 'release.label_values' must list each label value 0..{num_classes - 1} "
            f"exactly once (one per release class), got {values!r}."
        )
    if len(names) != num_classes:
        raise ValueError(
            f"{path}: the release lists {len(names)} classes but 'classes' has {num_classes}."
        )
    in_label_order = [""] * num_classes
    for name, value in zip(names, values):
        in_label_order[value] = name
    return tuple(in_label_order)


def _read_synonyms(path: Path, classes: Sequence[str]) -> Tuple[Tuple[str, ...], ...]:
    """Read a synonym file and return one tuple of synonyms per class, in class order."""
    data = _read_json(path, "Synonym file")
    table = data.get("synonyms") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected an object with a 'synonyms' object.")
    unknown = sorted(set(table) - set(classes))
    if unknown:
        raise ValueError(
            f"{path}: synonyms given for {unknown}, which are not classes {list(classes)}."
        )
    for name, terms in table.items():
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise ValueError(f"{path}: the synonyms of {name!r} must be a list of strings.")
    return tuple(tuple(table.get(name, ())) for name in classes)


def _check_ignore_and_background(data: Dict[str, Any], num_classes: int, path: Path) -> None:
    ignore_label = data.get("ignore_label")
    if not isinstance(ignore_label, int) or 0 <= ignore_label < num_classes:
        raise ValueError(
            f"{path}: 'ignore_label' must be an integer outside 0..{num_classes - 1}, "
            f"got {ignore_label!r}."
        )
    background = data.get("background_class")
    valid_background = isinstance(background, int) and 0 <= background < num_classes
    if background is not None and not valid_background:
        raise ValueError(
            f"{path}: 'background_class' must be null or a class index, got {background!r}."
        )


def load_class_list(benchmark: str, class_lists_dir: Optional[Path] = None) -> ClassList:
    """Read and check ``<class_lists_dir>/<benchmark>.json`` and its synonym file.

    Args:
        benchmark: the class list's name, e.g. "potsdam".
        class_lists_dir: the folder of class lists; default: the repository's
            ``datasets/class_lists``.

    Returns:
        The checked class list.

    Raises:
        FileNotFoundError: the folder, the class list or its synonym file is missing.
        ValueError: a field is malformed; the message names the file and the field.
    """
    folder = Path(class_lists_dir) if class_lists_dir is not None else CLASS_LISTS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Class-list folder {folder} not found. It ships with the SkySense-O repository "
            "(datasets/class_lists/); run from a checkout installed with 'pip install -e .'."
        )
    path = folder / f"{benchmark}.json"
    data = _read_json(path, f"Class list of {benchmark!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    classes = _check_names(data.get("classes"), "classes", path)
    if data.get("num_classes") != len(classes):
        raise ValueError(
            f"{path}: 'num_classes' is {data.get('num_classes')!r} but 'classes' has "
            f"{len(classes)}."
        )
    _check_ignore_and_background(data, len(classes), path)
    release_classes = None
    if data.get("release") is not None:
        release_classes = _release_in_label_order(data["release"], len(classes), path)
    synonyms_file = data.get("synonyms_file")
    return ClassList(
        benchmark=benchmark,
        path=path,
        classes=classes,
        ignore_label=data["ignore_label"],
        background_class=data.get("background_class"),
        colors=_check_colors(data.get("colors"), len(classes), path),
        release_classes=release_classes,
        synonyms=_read_synonyms(folder / synonyms_file, classes) if synonyms_file else None,
    )


def benchmark_metadata(
    benchmark: str, protocol: str, class_lists_dir: Optional[Path] = None
) -> Dict[str, Any]:
    """Build the metadata values that come from a benchmark's class list.

    Args:
        benchmark: the class list's name.
        protocol: "default" (this project's names) or "release" (the release's names).
        class_lists_dir: as in :func:`load_class_list`.

    Returns:
        ``stuff_classes``, ``ignore_label`` and, where known, ``stuff_colors``,
        ``background_class`` and ``synonyms`` (lists, aligned with ``stuff_classes``).
    """
    class_list = load_class_list(benchmark, class_lists_dir)
    if protocol == PROTOCOL_RELEASE:
        if class_list.release_classes is None:
            raise ValueError(
                f"{class_list.path} has no 'release' list, so {benchmark!r} has no release "
                "protocol."
            )
        names = class_list.release_classes
    elif protocol == PROTOCOL_DEFAULT:
        names = class_list.classes
    else:
        raise ValueError(
            f"protocol must be {PROTOCOL_DEFAULT!r} or {PROTOCOL_RELEASE!r}, got {protocol!r}."
        )
    values: Dict[str, Any] = {"stuff_classes": list(names), "ignore_label": class_list.ignore_label}
    if class_list.colors is not None:
        values["stuff_colors"] = [list(c) for c in class_list.colors]
    if class_list.background_class is not None:
        values["background_class"] = class_list.background_class
    if class_list.synonyms is not None:
        values["synonyms"] = [list(terms) for terms in class_list.synonyms]
    logger.info(
        "%s (%s protocol): %d classes from %s.", benchmark, protocol, len(names), class_list.path
    )
    return values


def pair_images_and_labels(image_dir: Path, label_dir: Path) -> List[Dict[str, str]]:
    """Pair every label PNG with the image of the same file stem.

    Args:
        image_dir: folder of images (PNG, JPEG, TIFF or BMP).
        label_dir: folder of single-channel label PNGs.

    Returns:
        Dataset dicts with ``file_name`` and ``sem_seg_file_name``, sorted by stem.

    Raises:
        ValueError: no labels, two images with one stem, or files without a partner.
    """
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == LABEL_SUFFIX}
    if not labels:
        raise ValueError(f"No label PNGs in {label_dir}; see {DATASETS_README} to prepare them.")
    images: Dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise ValueError(
                f"Two images share the stem {path.stem!r}: {images[path.stem]} and {path}."
            )
        images[path.stem] = path

    # A benchmark split must be complete: a missing partner means an interrupted preparation.
    for missing, folder, partner in (
        (sorted(set(labels) - set(images)), image_dir, "image"),
        (sorted(set(images) - set(labels)), label_dir, "label"),
    ):
        if missing:
            examples = ", ".join(missing[:_SHOWN_FILES])
            raise ValueError(
                f"{len(missing)} files have no {partner} in {folder} (e.g. {examples}); "
                f"finish or repeat the preparation described in {DATASETS_README}."
            )
    return [
        {"file_name": str(images[stem]), "sem_seg_file_name": str(labels[stem])}
        for stem in sorted(labels)
    ]


def load_benchmark_split(benchmark: str, split: BenchmarkSplit) -> List[Dict[str, str]]:
    """Load one split's dataset dicts from under the dataset root, read now.

    Raises:
        FileNotFoundError: the image or label folder is missing; the message names the folder,
            the benchmark and ``DETECTRON2_DATASETS``.
    """
    root = datasets_root()
    image_dir, label_dir = root / split.image_dir, root / split.label_dir
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Benchmark {benchmark!r} ({split.split} split): folder {folder} not found. "
                f"The dataset root is {DATASETS_ENV}="
                f"{os.environ.get(DATASETS_ENV, f'<unset, default {DEFAULT_DATASETS_ROOT!r}>')}; "
                f"set it to the folder holding {split.image_dir.split('/')[0]}/, or prepare "
                f"the benchmark as described in {DATASETS_README}."
            )
    dicts = pair_images_and_labels(image_dir, label_dir)
    logger.info(
        "Loaded %d images of %s (%s) from %s.", len(dicts), benchmark, split.split, image_dir
    )
    return dicts


def register_benchmark(benchmark: str, class_lists_dir: Optional[Path] = None) -> List[str]:
    """Register every split of ``benchmark`` (and its release protocol) without reading files.

    Args:
        benchmark: a key of ``BENCHMARK_SPLITS``.
        class_lists_dir: as in :func:`load_class_list`.

    Returns:
        The registered dataset names.
    """
    if benchmark not in BENCHMARK_SPLITS:
        raise KeyError(f"Unknown benchmark {benchmark!r}; known: {sorted(BENCHMARK_SPLITS)}.")
    protocols = {PROTOCOL_DEFAULT: ""}
    if benchmark in RELEASE_BENCHMARKS:
        protocols[PROTOCOL_RELEASE] = RELEASE_SUFFIX
    folder = Path(class_lists_dir) if class_lists_dir is not None else CLASS_LISTS_DIR
    names = []
    for split in BENCHMARK_SPLITS[benchmark]:
        for protocol, suffix in protocols.items():
            name = f"{benchmark}_{split.split}{suffix}"
            class_values = functools.partial(
                benchmark_metadata, benchmark, protocol, class_lists_dir
            )
            register_dataset(
                name,
                functools.partial(load_benchmark_split, benchmark, split),
                values={
                    "evaluator_type": EVALUATOR_TYPE,
                    "benchmark": benchmark,
                    "protocol": protocol,
                    "class_list_file": str(folder / f"{benchmark}.json"),
                },
                lazy={key: class_values for key in CLASS_LIST_KEYS},
            )
            names.append(name)
    return names


def register_all_benchmarks() -> List[str]:
    """Register every benchmark in ``BENCHMARK_SPLITS``; names already registered are kept.

    Returns:
        The names registered by this call.
    """
    names = []
    for benchmark in BENCHMARK_SPLITS:
        if f"{benchmark}_{BENCHMARK_SPLITS[benchmark][0].split}" in DatasetCatalog.list():
            continue
        names.extend(register_benchmark(benchmark))
    return names


register_all_benchmarks()
