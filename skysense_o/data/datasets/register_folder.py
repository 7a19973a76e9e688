"""Register a folder of your own images and index labels, and the quick-start datasets.

Folder layout (the layout of the bundled samples):

```
<root>/
  images/        image files (PNG, JPEG, TIFF, ...)
  labels/        one single-channel index PNG (or TIFF) per image, same stem
  classes.json   {"classes": [...], "ignore_index": 255, "palette": [[r, g, b], ...]}
```

Label value k means ``classes[k]``; ``ignore_index`` (default 255) marks unlabelled pixels and
``palette`` (optional) gives one colour per class. The folder works for training (every image
is taught with all classes) and for evaluation (fixed vocabulary ``stuff_classes``).

Dataset dicts: the Sky-SA keys (``file_name``, ``sem_seg_file_name``, ``label_format``
"index", ``class_names`` = all classes, ``dataset_name``) plus ``ignore_label``, the folder's
ignore value. Metadata: ``stuff_classes``, ``stuff_colors`` (when there is a palette),
``ignore_label``, ``evaluator_type`` and ``dataset_root``.

The quick-start datasets, registered at import and read only when loaded, live under
``<DETECTRON2_DATASETS>/skysense_quickstart/`` as written by ``tools/prepare_quickstart.py``:
``skysense_quickstart_train`` (a Sky-SA folder) and the folder datasets
``skysense_quickstart_val_dubai_aerial`` and ``skysense_quickstart_val_loveda``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .register_skysa import (
    DATASETS_ENV,
    EVALUATOR_TYPE,
    IGNORE_LABEL,
    LABEL_FORMAT_INDEX,
    datasets_root,
    register_dataset,
    register_skysa_location,
)

logger = logging.getLogger(__name__)

CLASSES_JSON = "classes.json"
IMAGES_DIRNAME = "images"
LABELS_DIRNAME = "labels"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")

QUICKSTART_DIRNAME = "skysense_quickstart"
QUICKSTART_TRAIN_SUBDIR = "train"
QUICKSTART_TRAIN_NAME = "skysense_quickstart_train"
# Dataset name -> (sub-folder of the quick-start folder, sample dataset it is taken from).
QUICKSTART_VAL_SETS = {
    "skysense_quickstart_val_dubai_aerial": ("val_dubai_aerial", "dubai_aerial"),
    "skysense_quickstart_val_loveda": ("val_loveda", "loveda"),
}
PREPARE_QUICKSTART_HINT = (
    "Run 'python tools/prepare_quickstart.py' first (it writes the quick-start data under "
    f"${DATASETS_ENV}, default ./datasets)."
)


@dataclasses.dataclass(frozen=True)
class FolderClasses:
    """The contents of a folder dataset's ``classes.json``."""

    classes: List[str]
    ignore_index: int = IGNORE_LABEL
    palette: Optional[List[List[int]]] = None


def _check_palette(palette: Any, num_classes: int, path: Path) -> List[List[int]]:
    valid = isinstance(palette, list) and len(palette) == num_classes
    valid = valid and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in palette
    )
    if not valid:
        raise ValueError(
            f"{path}: 'palette' must list one [r, g, b] triple (0..255) per class "
            f"({num_classes} classes)"
        )
    return [list(c) for c in palette]


def read_classes_json(root: os.PathLike | str) -> FolderClasses:
    """Read and check ``<root>/classes.json``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not valid JSON, or its keys have the wrong types.
    """
    path = Path(root) / CLASSES_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; a folder dataset needs a classes.json with "
            '{"classes": ["name", ...], "ignore_index": 255}'
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    classes = content.get("classes") if isinstance(content, dict) else None
    if not isinstance(classes, list) or not classes or not all(
        isinstance(c, str) and c.strip() for c in classes
    ):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of class names")
    ignore_index = content.get("ignore_index", IGNORE_LABEL)
    if not isinstance(ignore_index, int) or 0 <= ignore_index < len(classes):
        raise ValueError(
            f"{path}: 'ignore_index' must be an integer that is not a class index "
            f"(0..{len(classes) - 1}), got {ignore_index!r}"
        )
    palette = content.get("palette")
    if palette is not None:
        palette = _check_palette(palette, len(classes), path)
    return FolderClasses(classes=list(classes), ignore_index=ignore_index, palette=palette)


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> Dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder not found: {folder}")
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise ValueError(
                f"Two files in {folder} share the stem {path.stem!r}: {found[path.stem].name} "
                f"and {path.name}; keep one."
            )
        found[path.stem] = path
    return found


def _read_split_file(root: Path, split_file: os.PathLike | str) -> List[str]:
    path = Path(split_file).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"Split file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def list_folder_items(
    root: os.PathLike | str,
    *,
    split_file: Optional[os.PathLike | str] = None,
    stems: Optional[Sequence[str]] = None,
) -> List[Tuple[str, Path, Path]]:
    """List ``(stem, image path, label path)`` of a folder dataset, sorted by stem.

    Args:
        root: the dataset folder.
        split_file: a text file of stems to keep, one per line (``#`` starts a comment);
            relative paths start at ``root``.
        stems: stems to keep (combined with ``split_file`` when both are given).

    Raises:
        FileNotFoundError: ``images/``, ``labels/`` or the split file is missing.
        ValueError: an image has no label or a label no image (among the kept stems), or a
            requested stem does not exist.
    """
    root = Path(root)
    images = _files_by_stem(root / IMAGES_DIRNAME, IMAGE_SUFFIXES)
    labels = _files_by_stem(root / LABELS_DIRNAME, LABEL_SUFFIXES)
    selected = None
    if split_file is not None:
        selected = set(_read_split_file(root, split_file))
    if stems is not None:
        selected = set(stems) if selected is None else selected & set(stems)

    if selected is None:
        selected = set(images) | set(labels)
    unknown = sorted(selected - set(images) - set(labels))
    if unknown:
        raise ValueError(f"{root}: no image or label for the requested stems {unknown}")
    no_label = sorted(s for s in selected if s in images and s not in labels)
    if no_label:
        raise ValueError(f"{root}: images without a label in {LABELS_DIRNAME}/: {no_label}")
    no_image = sorted(s for s in selected if s in labels and s not in images)
    if no_image:
        raise ValueError(f"{root}: labels without an image in {IMAGES_DIRNAME}/: {no_image}")
    return [(stem, images[stem], labels[stem]) for stem in sorted(selected)]


def _folder_metadata_values(root: Path, hint: str) -> Dict[str, Any]:
    try:
        classes = read_classes_json(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. {hint}".strip()) from e
    values: Dict[str, Any] = {
        "stuff_classes": list(classes.classes),
        "ignore_label": classes.ignore_index,
    }
    if classes.palette is not None:
        values["stuff_colors"] = [list(c) for c in classes.palette]
    return values


def _load_folder(
    dataset_name: str,
    root_fn: Callable[[], Path],
    split_file: Optional[str],
    stems: Optional[Tuple[str, ...]],
    hint: str,
) -> List[Dict[str, Any]]:
    root = root_fn()
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset {dataset_name!r}: folder {root} not found. {hint}")
    classes = read_classes_json(root)
    items = list_folder_items(root, split_file=split_file, stems=stems)
    logger.info("Loaded %d images of %s from %s.", len(items), dataset_name, root)
    return [
        {
            "file_name": str(image_path),
            "sem_seg_file_name": str(label_path),
            "label_format": LABEL_FORMAT_INDEX,
            "class_names": list(classes.classes),
            "dataset_name": dataset_name,
            "ignore_label": classes.ignore_index,
        }
        for _, image_path, label_path in items
    ]


def _register_folder_location(
    name: str,
    root_fn: Callable[[], Path],
    *,
    split_file: Optional[str],
    stems: Optional[Tuple[str, ...]],
    hint: str,
    metadata_values: Optional[Dict[str, Any]],
) -> None:
    """Register a folder dataset; metadata from classes.json now (given) or on first access."""
    loader = functools.partial(_load_folder, name, root_fn, split_file, stems, hint)
    values = {"evaluator_type": EVALUATOR_TYPE}
    lazy = None
    if metadata_values is not None:
        values.update(metadata_values)
    else:
        metadata_loader = functools.partial(_folder_metadata_from_fn, root_fn, hint)
        lazy = {key: metadata_loader for key in ("stuff_classes", "stuff_colors", "ignore_label")}
    register_dataset(name, loader, values=values, lazy=lazy)


def _folder_metadata_from_fn(root_fn: Callable[[], Path], hint: str) -> Dict[str, Any]:
    return _folder_metadata_values(root_fn(), hint)


def _fixed_root(root: str) -> Path:
    return Path(root)


def register_folder_dataset(
    name: str,
    root: os.PathLike | str,
    *,
    split_file: Optional[os.PathLike | str] = None,
    stems: Optional[Sequence[str]] = None,
) -> None:
    """Register a folder of images, index labels and ``classes.json`` under ``name``.

    ``classes.json`` is read now, so that a missing or invalid one fails at once. The image
    list is read when the dataset is loaded.

    Args:
        name: the dataset name (for DATASETS.TRAIN or DATASETS.TEST).
        root: the folder (see the module docstring for its layout).
        split_file: optional text file of stems to use, see :func:`list_folder_items`.
        stems: optional stems to use.

    Raises:
        FileNotFoundError, ValueError: ``classes.json`` is missing or invalid.
        ValueError: ``name`` is already registered.
    """
    root_path = Path(root).expanduser().resolve()
    values = _folder_metadata_values(root_path, hint="")
    values["dataset_root"] = str(root_path)
    _register_folder_location(
        name,
        functools.partial(_fixed_root, str(root_path)),
        split_file=str(split_file) if split_file is not None else None,
        stems=tuple(stems) if stems is not None else None,
        hint="",
        metadata_values=values,
    )


def quickstart_root() -> Path:
    """Return ``<DETECTRON2_DATASETS>/skysense_quickstart`` (read from the environment now)."""
    return datasets_root() / QUICKSTART_DIRNAME


def _quickstart_subfolder(subdir: str) -> Path:
    return quickstart_root() / subdir


def _quickstart_missing_hint(folder: Path) -> str:
    return PREPARE_QUICKSTART_HINT


def register_all_quickstart() -> None:
    """Register the quick-start datasets; nothing is read until they are loaded."""
    register_skysa_location(
        QUICKSTART_TRAIN_NAME,
        functools.partial(_quickstart_subfolder, QUICKSTART_TRAIN_SUBDIR),
        hint_fn=_quickstart_missing_hint,
    )
    for name, (subdir, _) in QUICKSTART_VAL_SETS.items():
        _register_folder_location(
            name,
            functools.partial(_quickstart_subfolder, subdir),
            split_file=None,
            stems=None,
            hint=PREPARE_QUICKSTART_HINT,
            metadata_values=None,
        )


# Registration only: the quick-start folder is looked up when a dataset or its metadata loads.
register_all_quickstart()
