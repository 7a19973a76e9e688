#!/usr/bin/env python3
"""Prepare the quick-start datasets from the bundled remote-sensing samples.

Writes ``<DETECTRON2_DATASETS or ./datasets>/skysense_quickstart/``:

```
skysense_quickstart/
  train/              Sky-SA folder: every sample image not held out for validation
                      (dubai_aerial, loveda, isprs_potsdam), each with its own class list
  val_dubai_aerial/   folder dataset (images/, labels/, classes.json): 2 dubai_aerial images
  val_loveda/         folder dataset: 1 loveda image
  quickstart.json     what was written and a fingerprint of the samples it came from
```

These folders are the datasets ``skysense_quickstart_train``,
``skysense_quickstart_val_dubai_aerial`` and ``skysense_quickstart_val_loveda``.

Validation images are chosen by a fixed rule from the per-image label fractions in the
samples' ``manifest.json``: first the images whose labels contain the most classes, then,
among those, the ones whose rarest class covers the largest fraction of the image, then by
name. Every class should be present with enough pixels for its IoU to mean something. With the
current samples the rule picks ``dubai_t4_006`` (all 5 classes, the rarest 6.9%) and
``dubai_t1_009`` (all 5, the rarest 6.1%) for dubai_aerial. For loveda it picks ``loveda_1``,
the only image with 6 of the 7 classes.

The script is idempotent: when ``quickstart.json`` records the same samples fingerprint and every
file it lists is present with its recorded size, nothing is done. Otherwise the whole folder
is rebuilt in a temporary folder beside it, which then replaces the old one.

Usage:

    python tools/prepare_quickstart.py [SAMPLES_DIR] [--force]

SAMPLES_DIR defaults to ``$SKYSENSE_SAMPLES``, else the ``shared/data/rs_samples`` folder that
sits beside the repository checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

from skysense_o.data.datasets.register_folder import (
    CLASSES_JSON,
    IMAGES_DIRNAME,
    LABELS_DIRNAME,
    QUICKSTART_TRAIN_SUBDIR,
    QUICKSTART_VAL_SETS,
    list_folder_items,
    quickstart_root,
    read_classes_json,
)

logger = logging.getLogger("prepare_quickstart")

SAMPLES_ENV = "SKYSENSE_SAMPLES"
MANIFEST_JSON = "manifest.json"
STATE_JSON = "quickstart.json"
# Bump when the layout written here changes, so older quick-start folders are rebuilt.
FORMAT_VERSION = 1
TRAIN_SOURCES = ("dubai_aerial", "loveda", "isprs_potsdam")
# Validation images held out per sample dataset.
VALIDATION_COUNTS = {"dubai_aerial": 2, "loveda": 1}


def default_samples_dir() -> Path:
    """Return ``$SKYSENSE_SAMPLES``, else ``shared/data/rs_samples`` beside the repository."""
    configured = os.environ.get(SAMPLES_ENV)
    if configured:
        return Path(configured).expanduser()
    # parents[1] is the repository root; the sample folder sits in its parent directory.
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "rs_samples"


def _load_converter() -> ModuleType:
    """Import tools/convert_folder_to_skysa.py, the sibling script, by its file path.

    tools/ is not a package, so a plain import works only when this file runs as a script.
    Loading by path works from tests and other callers too, without touching sys.path.
    """
    name = "convert_folder_to_skysa"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    # The module must be in sys.modules while it runs, because dataclasses look it up there.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def choose_validation_stems(
    manifest: dict, dataset: str, count: int, ignore_index: int
) -> List[str]:
    """Pick ``count`` images of ``dataset`` by the rule of the module docstring.

    Args:
        manifest: the parsed ``manifest.json``.
        dataset: a key of ``manifest["datasets"]``.
        count: how many images to pick.
        ignore_index: the label value that is not a class.

    Returns:
        File stems, best first.
    """
    try:
        samples = manifest["datasets"][dataset]["samples"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{MANIFEST_JSON} lists no samples for {dataset!r}") from e
    ranked = []
    for sample in samples:
        fractions = {
            int(value): float(fraction)
            for value, fraction in sample["label_fractions"].items()
            if int(value) != ignore_index and float(fraction) > 0
        }
        rarest = min(fractions.values(), default=0.0)
        ranked.append((-len(fractions), -rarest, Path(sample["image"]).stem))
    if len(ranked) <= count:
        raise ValueError(
            f"{dataset} has {len(ranked)} samples; holding out {count} would leave none to train on"
        )
    return [stem for _, _, stem in sorted(ranked)[:count]]


def samples_fingerprint(samples_dir: Path) -> str:
    """Return the SHA-256 of every sample file the quick start reads (names and bytes)."""
    digest = hashlib.sha256(f"format {FORMAT_VERSION}\n".encode())
    files = [samples_dir / MANIFEST_JSON]
    for dataset in TRAIN_SOURCES:
        folder = samples_dir / dataset
        files.append(folder / CLASSES_JSON)
        for _, image_path, label_path in list_folder_items(folder):
            files.extend([image_path, label_path])
    for path in files:
        digest.update(f"{path.relative_to(samples_dir).as_posix()}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _write_validation_folder(source: Path, stems: Sequence[str], out_dir: Path) -> None:
    (out_dir / IMAGES_DIRNAME).mkdir(parents=True)
    (out_dir / LABELS_DIRNAME).mkdir(parents=True)
    shutil.copyfile(source / CLASSES_JSON, out_dir / CLASSES_JSON)
    for _, image_path, label_path in list_folder_items(source, stems=stems):
        shutil.copyfile(image_path, out_dir / IMAGES_DIRNAME / image_path.name)
        shutil.copyfile(label_path, out_dir / LABELS_DIRNAME / label_path.name)


def _listed_files(folder: Path) -> Dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != STATE_JSON
    }


def is_up_to_date(out_dir: Path, fingerprint: str) -> bool:
    """Check that ``out_dir`` was written from samples with ``fingerprint`` and is complete."""
    state_path = out_dir / STATE_JSON
    if not state_path.is_file():
        return False
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if state.get("format_version") != FORMAT_VERSION or state.get("fingerprint") != fingerprint:
        return False
    files = state.get("files", {})
    return bool(files) and all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
        for name, size in files.items()
    )


def _build(samples_dir: Path, manifest: dict, build_dir: Path) -> Dict[str, List[str]]:
    """Write the quick-start folders into ``build_dir``; returns the validation stems."""
    converter = _load_converter()
    validation: Dict[str, List[str]] = {}
    for name, (subdir, dataset) in QUICKSTART_VAL_SETS.items():
        source = samples_dir / dataset
        ignore_index = read_classes_json(source).ignore_index
        stems = choose_validation_stems(
            manifest, dataset, VALIDATION_COUNTS[dataset], ignore_index
        )
        validation[dataset] = stems
        _write_validation_folder(source, stems, build_dir / subdir)
        logger.info("%s: validation images %s", name, stems)

    plans = [
        converter.plan_conversion(samples_dir / dataset, exclude=validation.get(dataset))
        for dataset in TRAIN_SOURCES
    ]
    records = converter.write_skysa(plans, build_dir / QUICKSTART_TRAIN_SUBDIR)
    logger.info("Training set: %d images from %s", len(records), ", ".join(TRAIN_SOURCES))
    return validation


def prepare_quickstart(
    samples_dir: Path, out_dir: Optional[Path] = None, *, force: bool = False
) -> bool:
    """Write the quick-start folder unless it is already up to date.

    Args:
        samples_dir: the folder with dubai_aerial/, loveda/, isprs_potsdam/, manifest.json.
        out_dir: default ``<DETECTRON2_DATASETS>/skysense_quickstart``.
        force: rebuild even when up to date.

    Returns:
        True when the folder was (re)built, False when it was already up to date.
    """
    samples_dir = Path(samples_dir)
    out_dir = Path(out_dir) if out_dir is not None else quickstart_root()
    manifest_path = samples_dir / MANIFEST_JSON
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found; pass the rs_samples folder or set {SAMPLES_ENV}"
        )
    fingerprint = samples_fingerprint(samples_dir)
    if not force and is_up_to_date(out_dir, fingerprint):
        logger.info("%s is up to date; nothing to do.", out_dir)
        return False

    # Build beside the target and swap it in at the end, so an interrupted run leaves the
    # old folder (or nothing) rather than a half-written one.
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        validation = _build(samples_dir, manifest, build_dir)
        state = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "samples_dir": str(samples_dir.resolve()),
            "validation_stems": validation,
            "files": _listed_files(build_dir),
        }
        (build_dir / STATE_JSON).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build_dir.rename(out_dir)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir)
    logger.info("Wrote the quick-start datasets to %s.", out_dir)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "samples_dir",
        nargs="?",
        type=Path,
        default=None,
        help=f"the rs_samples folder (default: ${SAMPLES_ENV}, else the one beside the repository)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    samples_dir = args.samples_dir if args.samples_dir is not None else default_samples_dir()
    try:
        built = prepare_quickstart(samples_dir, force=args.force)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'Prepared' if built else 'Up to date'}: {quickstart_root()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
