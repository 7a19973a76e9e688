"""Register Sky-SA-format datasets (per-image vocabularies) in Detectron2's catalogs.

A Sky-SA folder contains ``img_dir/``, ``ann_dir/``, ``skysa_dataset.jsonl`` (one JSON object per
image: ``flickr_url`` the image path, ``segmentation`` the label path, ``ann_list`` a list of
``{"category_name": ...}``) and optionally ``skysa_graph.jsonl`` (the visual-relevance graph).
Label value k of an image means ``ann_list[k].category_name`` and 255 is ignore. Paths in the
jsonl are relative to the folder (absolute paths are kept).

Registered at import, read only when loaded:

* ``skysa_train``: ``<DETECTRON2_DATASETS>/Sky-SA/skysa_dataset.jsonl``.
* ``skysa_test``: ``<DETECTRON2_DATASETS>/Sky-SA/skysa_test.jsonl``, a held-out split in the
  same format that users may add (the release ships none).

``DETECTRON2_DATASETS`` defaults to ``datasets`` (relative to the working directory) and is
read when a dataset is loaded, not at import.

Dataset dicts: ``file_name``, ``sem_seg_file_name``, ``label_format`` ("index" for a label
PNG, "binary_masks" for a folder of per-class masks, chosen by the path: a path without an
image suffix is a folder), ``class_names`` (the ``ann_list`` names) and ``dataset_name``.

Metadata: ``ignore_label`` (255), ``evaluator_type``, and two keys computed on first access
(see :class:`LazyMetadata`): ``graph_file`` (the folder's ``skysa_graph.jsonl`` when it exists,
else "") and ``vocabulary`` (the sorted union of the class names, which loads the dataset).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

logger = logging.getLogger(__name__)

DATASETS_ENV = "DETECTRON2_DATASETS"
DEFAULT_DATASETS_ROOT = "datasets"
SKYSA_DIRNAME = "Sky-SA"
TRAIN_JSONL = "skysa_dataset.jsonl"
TEST_JSONL = "skysa_test.jsonl"
GRAPH_JSONL = "skysa_graph.jsonl"

# Metadata values shared with the evaluators.
EVALUATOR_TYPE = "skysense_sem_seg"
IGNORE_LABEL = 255
LABEL_FORMAT_INDEX = "index"
LABEL_FORMAT_BINARY_MASKS = "binary_masks"
# A label path with one of these suffixes is a label image; any other path is a folder of
# per-class binary masks.
LABEL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".webp", ".gif")

SKYSA_SPLITS = {"skysa_train": TRAIN_JSONL, "skysa_test": TEST_JSONL}


def datasets_root() -> Path:
    """Return the dataset root: ``$DETECTRON2_DATASETS``, else ``datasets``, read now."""
    return Path(os.environ.get(DATASETS_ENV, DEFAULT_DATASETS_ROOT)).expanduser()


class LazyMetadata(Metadata):
    """Detectron2 metadata whose listed keys are computed by a loader on first access.

    Registration must not read files, yet evaluators and mappers expect keys such as
    ``stuff_classes`` that come from files. A loader returns a dict of values, all set at once
    on the first access to any key it provides. A key the loader leaves out stays absent. A
    loader that raises is tried again on the next access.

    Args:
        name: the dataset name.
        lazy: ``{key: loader}``; several keys may share one loader.
        values: keys known at registration.
    """

    def __init__(
        self,
        name: str = "N/A",
        lazy: Optional[Dict[str, Callable[[], Dict[str, Any]]]] = None,
        **values: Any,
    ):
        super().__init__(name=name, **values)
        object.__setattr__(self, "_lazy_loaders", dict(lazy or {}))

    def __getattr__(self, key: str) -> Any:
        loaders = self.__dict__.get("_lazy_loaders", {})
        loader = loaders.get(key)
        if loader is None:
            return super().__getattr__(key)
        loaded = loader()
        for loaded_key, value in loaded.items():
            object.__setattr__(self, loaded_key, value)
        for pending_key in [k for k, f in loaders.items() if f is loader]:
            del loaders[pending_key]
        if key not in loaded:
            return super().__getattr__(key)
        return loaded[key]

    def as_dict(self) -> Dict[str, Any]:
        """Return the keys set so far (keys whose loader has not run yet are left out)."""
        values = super().as_dict()
        values.pop("_lazy_loaders", None)
        return values


def register_dataset(
    name: str,
    loader: Callable[[], List[Dict[str, Any]]],
    *,
    values: Dict[str, Any],
    lazy: Optional[Dict[str, Callable[[], Dict[str, Any]]]] = None,
) -> None:
    """Register ``loader`` in DatasetCatalog and a :class:`LazyMetadata` in MetadataCatalog.

    Raises:
        ValueError: ``name`` is already registered in either catalog.
    """
    if name in DatasetCatalog.list() or name in MetadataCatalog.list():
        raise ValueError(f"A dataset named {name!r} is already registered; choose another name.")
    DatasetCatalog.register(name, loader)
    MetadataCatalog[name] = LazyMetadata(name=name, lazy=lazy, **values)


def unregister_dataset(name: str) -> None:
    """Remove ``name`` from DatasetCatalog and MetadataCatalog, so it can be registered again."""
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://", "ftp://"))


def _category_names(ann_list: Any, where: str) -> List[str]:
    if not isinstance(ann_list, list):
        raise ValueError(f"{where}: 'ann_list' must be a list, got {type(ann_list).__name__}")
    names = []
    for entry in ann_list:
        name = entry.get("category_name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"{where}: each 'ann_list' entry needs a non-empty 'category_name', got {entry!r}"
            )
        names.append(name.strip())
    return names


def _resolve_path(value: Any, key: str, base_dir: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty path string, got {value!r}")
    if _is_url(value):
        raise ValueError(
            f"{where}: '{key}' is a URL ({value}); download the files and write paths relative "
            f"to {base_dir} instead."
        )
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def skysa_record_to_dict(
    record: Any, *, base_dir: Path, dataset_name: str, where: str
) -> Optional[Dict[str, Any]]:
    """Turn one parsed jsonl object into a dataset dict; None when its ``ann_list`` is empty.

    Args:
        record: the JSON object of one line.
        base_dir: the folder that relative paths start from.
        dataset_name: stored in the dict as ``dataset_name``.
        where: ``"<file>, line <n>"`` for messages.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("flickr_url", "segmentation", "ann_list"):
        if key not in record:
            raise ValueError(f"{where}: missing key '{key}'")
    class_names = _category_names(record["ann_list"], where)
    if not class_names:
        return None
    label_path = _resolve_path(record["segmentation"], "segmentation", base_dir, where)
    is_image = label_path.suffix.lower() in LABEL_IMAGE_SUFFIXES
    return {
        "file_name": str(_resolve_path(record["flickr_url"], "flickr_url", base_dir, where)),
        "sem_seg_file_name": str(label_path),
        "label_format": LABEL_FORMAT_INDEX if is_image else LABEL_FORMAT_BINARY_MASKS,
        "class_names": class_names,
        "dataset_name": dataset_name,
    }


def load_skysa_jsonl(
    jsonl_path: Path, *, dataset_name: str, base_dir: Optional[Path] = None
) -> List[Dict[str, Any]]:
    """Read a Sky-SA jsonl file into dataset dicts (module docstring), skipping empty images.

    Args:
        jsonl_path: the ``skysa_dataset.jsonl``-format file.
        dataset_name: stored in each dict.
        base_dir: the folder relative paths start from; default: the file's folder.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON or lacks a key (the message names the line), or no
            image is left.
    """
    jsonl_path = Path(jsonl_path)
    base_dir = Path(base_dir) if base_dir is not None else jsonl_path.parent
    dicts, skipped = [], 0
    with open(jsonl_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{jsonl_path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from e
            parsed = skysa_record_to_dict(
                record, base_dir=base_dir, dataset_name=dataset_name, where=where
            )
            if parsed is None:
                skipped += 1
            else:
                dicts.append(parsed)
    if skipped:
        logger.warning("%s: skipped %d images with an empty ann_list.", jsonl_path, skipped)
    if not dicts:
        # Detectron2 would stop on an empty dataset only with an assert, which python -O
        # removes, so the dataset is rejected here with its file named.
        raise ValueError(
            f"{jsonl_path} lists no usable image: {skipped} with an empty ann_list and no "
            "other record. Add records whose ann_list names the classes of the label."
        )
    logger.info("Loaded %d images of %s from %s.", len(dicts), dataset_name, jsonl_path)
    return dicts


def _env_folder(*parts: str) -> Path:
    return datasets_root().joinpath(*parts)


def _fixed_folder(folder: str) -> Path:
    return Path(folder)


def _missing_hint_env(folder: Path) -> str:
    return (
        f"Download Sky-SA into {folder} or set {DATASETS_ENV} (now "
        f"{os.environ.get(DATASETS_ENV, '<unset>')}, default '{DEFAULT_DATASETS_ROOT}') to the "
        f"folder that contains {SKYSA_DIRNAME}/."
    )


def _missing_hint_fixed(folder: Path) -> str:
    return f"Check the folder given when the dataset was registered ({folder})."


def _load_registered(
    dataset_name: str,
    folder_fn: Callable[[], Path],
    jsonl_name: str,
    hint_fn: Callable[[Path], str],
) -> List[Dict[str, Any]]:
    folder = folder_fn()
    jsonl_path = folder / jsonl_name
    if not jsonl_path.is_file():
        raise FileNotFoundError(
            f"Dataset {dataset_name!r}: {jsonl_path} not found. {hint_fn(folder)}"
        )
    return load_skysa_jsonl(jsonl_path, dataset_name=dataset_name, base_dir=folder)


def _graph_file_values(folder_fn: Callable[[], Path]) -> Dict[str, Any]:
    graph_path = folder_fn() / GRAPH_JSONL
    return {"graph_file": str(graph_path) if graph_path.is_file() else ""}


def vocabulary_of_dicts(dataset_dicts: Sequence[Dict[str, Any]]) -> List[str]:
    """Return the sorted union of the ``class_names`` of dataset dicts."""
    return sorted({name for d in dataset_dicts for name in d["class_names"]})


def _vocabulary_values(dataset_name: str) -> Dict[str, Any]:
    return {"vocabulary": vocabulary_of_dicts(DatasetCatalog.get(dataset_name))}


def register_skysa_location(
    name: str,
    folder_fn: Callable[[], Path],
    *,
    jsonl_name: str = TRAIN_JSONL,
    hint_fn: Callable[[Path], str] = _missing_hint_fixed,
) -> None:
    """Register a Sky-SA-format dataset whose folder is found by calling ``folder_fn`` at load.

    Args:
        name: the dataset name.
        folder_fn: returns the Sky-SA folder; a picklable module-level function or partial.
        jsonl_name: the jsonl file inside the folder.
        hint_fn: builds the advice of the FileNotFoundError raised when the file is missing.
    """
    register_dataset(
        name,
        functools.partial(_load_registered, name, folder_fn, jsonl_name, hint_fn),
        values={"ignore_label": IGNORE_LABEL, "evaluator_type": EVALUATOR_TYPE},
        lazy={
            "graph_file": functools.partial(_graph_file_values, folder_fn),
            "vocabulary": functools.partial(_vocabulary_values, name),
        },
    )


def register_skysa_folder(
    name: str, folder: os.PathLike | str, *, jsonl_name: str = TRAIN_JSONL
) -> None:
    """Register any Sky-SA-format folder (for example a converted dataset) under ``name``.

    Args:
        name: the dataset name, used in DATASETS.TRAIN.
        folder: the folder holding ``jsonl_name``, ``img_dir/`` and ``ann_dir/``.
        jsonl_name: the jsonl file inside the folder.
    """
    folder_path = Path(folder).expanduser().resolve()
    register_skysa_location(
        name, functools.partial(_fixed_folder, str(folder_path)), jsonl_name=jsonl_name
    )


def register_all_skysa() -> None:
    """Register ``skysa_train`` and ``skysa_test`` under ``$DETECTRON2_DATASETS/Sky-SA``."""
    for name, jsonl_name in SKYSA_SPLITS.items():
        register_skysa_location(
            name,
            functools.partial(_env_folder, SKYSA_DIRNAME),
            jsonl_name=jsonl_name,
            hint_fn=_missing_hint_env,
        )


# Registration only: the dataset root is read and the files are opened when a dataset loads.
register_all_skysa()
