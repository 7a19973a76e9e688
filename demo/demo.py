#!/usr/bin/env python3
"""Segment remote-sensing images with class names chosen at run time.

Examples:
    python demo/demo.py --input images/ --texts "building,road,water,tree" --output out/ \
        --weights output/quickstart/model_final.pth
    python demo/demo.py --input "scenes/*.tif" --texts "potsdam_dataset,solar panel" \
        --output out/ --sliding-window --opts INPUT.MIN_SIZE_TEST 0
    python demo/demo.py --output out/        # interactive: prompts for names, then paths

For every image it writes, into --output: ``<stem>_labels.png`` (or ``<stem>_labels.tif`` with
the input's georeferencing for a TIFF input), ``<stem>_color.png``, ``<stem>_overlay.png``,
``<stem>_classes.json`` and, with --probabilities, ``<stem>_probabilities.tif``. See
demo/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import secrets
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from predictor import (
    DEFAULT_CONFIG_FILE,
    Predictor,
    Vocabulary,
    label_dtype,
    load_config,
    parse_class_names,
)
from skysense_o.utils.image_io import RASTERIO_SUFFIXES, read_geotiff, read_image
from skysense_o.utils.visualization import (
    add_legend,
    class_palette,
    colorize,
    draw_segmentation,
    legend_entries,
)
from skysense_o.utils.weights import CheckpointMismatchError

logger = logging.getLogger(__name__)

# Files taken from a folder or a glob pattern; a file named directly is always tried.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp") + RASTERIO_SUFFIXES
GLOB_CHARACTERS = "*?["
# GeoTIFF metadata tag that stores the class names, a JSON list indexed by label value.
CLASS_NAMES_TAG = "CLASS_NAMES"
TEXTS_HELP = (
    "class names, comma-separated; 'open_world' for the open-world list; "
    "'<benchmark>_dataset' (e.g. potsdam_dataset, loveda_dataset) for a benchmark's list; "
    "tokens can be combined, e.g. 'potsdam_dataset,solar panel'"
)
# Errors that concern one input image; the batch reports them and goes on.
IMAGE_ERRORS = (OSError, ValueError, MemoryError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    """Return the demo's command-line parser."""
    parser = argparse.ArgumentParser(
        description="Open-vocabulary segmentation of remote-sensing images with SkySense-O. "
        "Without --input it runs interactively.",
    )

    # Inputs, class names and outputs.
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files, folders or glob patterns (quoted)")
    parser.add_argument("--texts", help=TEXTS_HELP)
    parser.add_argument("--output", default="output/demo",
                        help="folder for the results (default: output/demo)")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <stem>_probabilities.tif, one float32 band per class")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: keep them and skip)")

    # The model and how it predicts.
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_FILE),
                        help="model config file (default: configs/quickstart.yaml)")
    parser.add_argument("--weights", help="model checkpoint; default: MODEL.WEIGHTS of the "
                        "config. Without either the model runs with random weights")
    parser.add_argument("--device", help="'cpu', 'cuda' or 'cuda:<index>' "
                        "(default: cuda when available, else cpu)")
    parser.add_argument("--sliding-window", action=argparse.BooleanOptionalAction, default=None,
                        help="predict in overlapping windows (size and stride: "
                        "MODEL.SKYSENSE_O.INFERENCE.WINDOW and STRIDE), or not; default: "
                        "MODEL.SKYSENSE_O.INFERENCE.MODE")

    # Band selection, the open-world graph and config overrides.
    parser.add_argument("--bands", nargs=3, type=int, metavar=("R", "G", "B"),
                        help="0-based bands of a multi-band image used as R, G, B "
                        "(default: INPUT.BANDS, the first three)")
    parser.add_argument("--graph", help="visual-relevance graph (skysa_graph.jsonl); "
                        "'open_world' then means its nodes (default: DATASETS.SKYSA.GRAPH_FILE; "
                        "without one, the 218 names of datasets/class_lists/open_world.json)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides, e.g. INPUT.MIN_SIZE_TEST 0")
    return parser


# ---- inputs --------------------------------------------------------------------------------


def _is_inside(path: Path, folder: Path) -> bool:
    return folder == path.parent or folder in path.parents


def collect_inputs(patterns: Sequence[str], output_dir: Path) -> Tuple[List[Path], List[str]]:
    """Expand files, folders and glob patterns into image files.

    Folders are listed without recursion, and only files with an image suffix are taken from
    folders and patterns. Files inside ``output_dir`` are left out, so that the demo's own
    pictures are not segmented again. A file named twice is kept once.

    Returns:
        (the image files in the order given, an error message per pattern that matched no file).
    """
    output_dir = output_dir.resolve()
    files: List[Path] = []
    errors: List[str] = []
    seen = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists() or not any(c in pattern for c in GLOB_CHARACTERS):
            # A missing file is kept so that it is reported as failed, with the reason.
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        matches = [p for p in matches if not _is_inside(p.resolve(), output_dir)]
        if not matches:
            errors.append(f"{pattern!r} matches no image file")
        for match in matches:
            if match.resolve() not in seen:
                seen.add(match.resolve())
                files.append(match)
    return files, errors


# ---- atomic outputs ------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed to ``path`` when the block succeeds.

    A reader never sees a partly written file: on an error the temporary file is deleted and
    ``path`` keeps its previous content.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")


def _raster_profile(profile: Optional[dict], shape: Tuple[int, ...], dtype, count: int) -> dict:
    """Return a GeoTIFF profile with the georeferencing of ``profile`` (None: none)."""
    result = {"driver": "GTiff", "height": shape[0], "width": shape[1], "count": count,
              "dtype": np.dtype(dtype).name, "compress": "deflate"}
    if profile is not None:
        result.update(crs=profile.get("crs"), transform=profile.get("transform"))
    return result


@contextlib.contextmanager
def _open_raster_for_writing(path: Path, profile: dict):
    """Open a temporary GeoTIFF for ``path`` and rename it to ``path`` once closed."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    # GDAL_PAM_ENABLED=NO keeps GDAL from writing a side-car .aux.xml file beside the output.
    with atomic_path(path) as temporary, rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(temporary, "w", **profile) as dataset:
                yield dataset


def write_label_geotiff(path: Path, labels: np.ndarray, class_names: Sequence[str],
                        profile: Optional[dict]) -> None:
    """Write a label map as a GeoTIFF with the CRS and transform of ``profile``.

    The class names are stored in the ``CLASS_NAMES`` tag (a JSON list); 8-bit maps also get
    a colour table with the demo's class colours.
    """
    with _open_raster_for_writing(path, _raster_profile(profile, labels.shape, labels.dtype,
                                                        1)) as dataset:
        # GDAL accepts a colour table only before the pixels are written.
        if labels.dtype == np.uint8:
            palette = class_palette(class_names)
            dataset.write_colormap(1, {i: (*rgb, 255) for i, rgb in enumerate(palette)})
        dataset.update_tags(**{CLASS_NAMES_TAG: json.dumps(list(class_names))})
        dataset.set_band_description(1, "class index, see the CLASS_NAMES tag")
        dataset.write(labels, 1)


# ---- one image ---------------------------------------------------------------------------


@dataclass
class DemoSession:
    """The predictor, the class names and the output options of one run of the demo."""

    predictor: Predictor
    output_dir: Path
    vocabulary: Optional[Vocabulary] = None
    sliding_window: Optional[bool] = None
    bands: Optional[Sequence[int]] = None
    probabilities: bool = False
    overwrite: bool = False
    stems: Dict[str, Path] = field(default_factory=dict)

    def output_paths(self, source: Path) -> Dict[str, Path]:
        """Return the output file of each kind ("labels", "color", ...) for ``source``."""
        stem = source.stem
        label_suffix = ".tif" if source.suffix.lower() in RASTERIO_SUFFIXES else ".png"
        paths = {
            "labels": self.output_dir / f"{stem}_labels{label_suffix}",
            "color": self.output_dir / f"{stem}_color.png",
            "overlay": self.output_dir / f"{stem}_overlay.png",
            "classes": self.output_dir / f"{stem}_classes.json",
        }
        if self.probabilities:
            paths["probabilities"] = self.output_dir / f"{stem}_probabilities.tif"
        return paths

    def claim_stem(self, source: Path) -> None:
        """Reserve the output names of ``source``; a second file with its stem is rejected."""
        owner = self.stems.setdefault(source.stem, source.resolve())
        if owner != source.resolve():
            raise ValueError(
                f"its outputs would replace those of {owner}, which has the same file stem "
                f"{source.stem!r}; rename one of them or run them into different --output folders"
            )

    def _read(self, source: Path) -> Tuple[np.ndarray, Optional[dict]]:
        bands = self.bands if self.bands is not None else self.predictor.bands
        max_pixels = self.predictor.max_image_pixels
        if source.suffix.lower() in RASTERIO_SUFFIXES:
            return read_geotiff(source, bands=bands, max_pixels=max_pixels)
        return read_image(source, bands=bands, max_pixels=max_pixels), None

    def process(self, source: Path) -> List[Path]:
        """Segment one image and write its missing outputs (all of them with ``overwrite``).

        Returns:
            The files written; empty when every output already existed.

        Raises:
            FileNotFoundError, ValueError, OSError, MemoryError, RuntimeError: the image could
                not be read or predicted; nothing of it is left half written.
        """
        assert self.vocabulary is not None, "class names must be set before images"
        self.claim_stem(source)
        targets = self.output_paths(source)
        pending = {k: p for k, p in targets.items() if self.overwrite or not p.exists()}
        if not pending:
            logger.info("Skipped %s: its outputs exist in %s (use --overwrite to replace them)",
                        source, self.output_dir)
            return []
        kept = sorted(p.name for k, p in targets.items() if k not in pending)
        if kept:
            logger.info("%s: keeping existing %s (use --overwrite to replace them)",
                        source, ", ".join(kept))

        image, profile = self._read(source)
        labels = self._predict(image, profile, pending.get("probabilities"))
        self._write_outputs(source, image, labels, profile, pending)
        return list(pending.values())

    def _predict(self, image: np.ndarray, profile: Optional[dict],
                 probabilities_path: Optional[Path]) -> np.ndarray:
        """Predict the label map, streaming the probabilities to a GeoTIFF when asked."""
        names = self.vocabulary.names
        synonyms = self.vocabulary.synonyms if self.predictor.retrieval_augmentation else None
        if probabilities_path is not None:
            return self._predict_with_probabilities(image, profile, probabilities_path, synonyms)
        predicted = self.predictor.predict(image, names, synonyms=synonyms,
                                           sliding_window=self.sliding_window)
        return predicted.labels

    def _predict_with_probabilities(self, image, profile, path, synonyms) -> np.ndarray:
        from rasterio.windows import Window

        names = self.vocabulary.names
        labels = np.empty(image.shape[:2], dtype=label_dtype(len(names)))
        raster = _raster_profile(profile, image.shape, np.float32, len(names))
        with _open_raster_for_writing(path, dict(raster, predictor=3)) as dataset:
            for index, name in enumerate(names, start=1):
                dataset.set_band_description(index, name)
            dataset.update_tags(**{CLASS_NAMES_TAG: json.dumps(names)})

            def store(row_start: int, row_end: int, scores: torch.Tensor) -> None:
                labels[row_start:row_end] = scores.argmax(dim=0).cpu().numpy()
                window = Window(0, row_start, image.shape[1], row_end - row_start)
                dataset.write(scores.float().cpu().numpy(), window=window)

            self.predictor.predict_rows(image, names, store, synonyms=synonyms,
                                        sliding_window=self.sliding_window)
        return labels

    def _write_outputs(self, source, image, labels, profile, pending: Dict[str, Path]) -> None:
        names = self.vocabulary.names
        entries = legend_entries(labels, names)
        present_names = [name for name, _ in entries]
        present_colors = [color for _, color in entries]
        present_values = np.unique(labels).tolist()
        if "labels" in pending:
            if pending["labels"].suffix == ".tif":
                write_label_geotiff(pending["labels"], labels, names, profile)
            else:
                write_png(pending["labels"], labels)
        if "color" in pending:
            write_png(pending["color"],
                      add_legend(colorize(labels, names), present_names, present_colors))
        if "overlay" in pending:
            write_png(pending["overlay"], draw_segmentation(image, labels, names))
        if "classes" in pending:
            write_json(pending["classes"], {
                "image": str(source),
                "classes": {str(i): name for i, name in enumerate(names)},
                "present": {str(value): names[value] for value in present_values},
                "weights": self.predictor.weights or None,
            })


# ---- batch and interactive runs ------------------------------------------------------------


def run_batch(session: DemoSession, patterns: Sequence[str], state=None) -> int:
    """Segment every image of ``patterns``; return the number of images that failed.

    Args:
        state: accelerate's ``PartialState`` when the demo runs in several processes
            (``accelerate launch``). Each process then segments its share of the files, and
            only the main process reports the inputs that could not be listed.
    """
    files, errors = collect_inputs(patterns, session.output_dir)
    is_main = state is None or state.is_main_process
    failed = 0
    if is_main:
        for error in errors:
            logger.error("Input %s", error)
        failed = len(errors)
    if state is not None and state.num_processes > 1:
        # Every process claims every stem in input order, so they agree on which file of a
        # repeated stem is written and which one is rejected, whichever process gets it.
        for source in files:
            with contextlib.suppress(ValueError):
                session.claim_stem(source)
        with state.split_between_processes(files) as share:
            files = list(share)
    written = skipped = 0
    with logging_redirect_tqdm():
        # tqdm hides the bar when stderr is not a terminal (disable=None), so logs written to a
        # file keep one message per line.
        for source in tqdm(files, desc="Segmenting", unit="image",
                           disable=None if is_main else True):
            try:
                outputs = session.process(source)
            except IMAGE_ERRORS as e:
                failed += 1
                # A RuntimeError may be a bug rather than bad input, so its traceback is kept.
                logger.error("Failed on %s: %s", source, e, exc_info=isinstance(e, RuntimeError))
                continue
            if outputs:
                logger.info("Wrote %s", ", ".join(str(path) for path in outputs))
            written += bool(outputs)
            skipped += not outputs
    process = "" if state is None or state.num_processes == 1 else \
        f" by process {state.process_index} of {state.num_processes}"
    logger.info("Done%s: %d images written, %d skipped, %d failed; outputs in %s",
                process, written, skipped, failed, session.output_dir)
    return failed


def _any_input_exists(patterns: Sequence[str], output_dir: Path) -> bool:
    """Return whether ``patterns`` name at least one existing file, logging an error otherwise.

    Checking this before the model is built spares a user who mistyped every path the
    model's start-up time, and leaves no empty output folder behind.
    """
    files, errors = collect_inputs(patterns, output_dir)
    if any(path.is_file() for path in files):
        return True
    for error in errors:
        logger.error("Input %s", error)
    for path in files:
        logger.error("Input %s: image file not found", path)
    logger.error("No input image exists, so nothing was segmented: check the --input paths.")
    return False


def log_vocabulary(vocabulary: Vocabulary) -> None:
    """Log the class names in use (the first 20 of a long list)."""
    names = vocabulary.names
    listed = ", ".join(names[:20])
    if len(names) > 20:
        listed += f", ... ({len(names) - 20} more)"
    noun = "class" if len(names) == 1 else "classes"
    logger.info("Segmenting with %d %s: %s", len(names), noun, listed)


def _ask(prompt: str) -> Optional[str]:
    """Return the next line typed after ``prompt``, or None on end of input or an empty line."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    return line.strip() or None


def run_interactive(session: DemoSession, graph_file: str) -> int:
    """Ask for class names, then for image paths until an empty line or end of input.

    Returns:
        The number of images that failed.
    """
    while session.vocabulary is None:
        text = _ask("Class names (comma-separated; open_world; <benchmark>_dataset): ")
        if text is None:
            return 0
        try:
            session.vocabulary = parse_class_names(text, graph_file=graph_file)
        except ValueError as e:
            logger.error("%s", e)
    log_vocabulary(session.vocabulary)
    failed = 0
    while True:
        text = _ask("Image path (a file, folder or quoted glob pattern; empty line quits): ")
        if text is None:
            return failed
        failed += run_batch(session, [text])


def setup_logging() -> None:
    """Log INFO and higher of the demo and of SkySense-O to stderr, WARNING and higher of the
    libraries they use."""
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s %(name)s %(levelname)s] "
                        "%(message)s", datefmt="%H:%M:%S")
    for name in (__name__, "predictor", "skysense_o"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments; return the exit status (0: every image written)."""
    try:
        cfg = load_config(args.config, args.opts)
    except FileNotFoundError as e:
        logger.error("%s", e)
        return 2
    graph_file = args.graph or cfg.DATASETS.SKYSA.GRAPH_FILE
    vocabulary = None
    if args.texts is not None:
        try:
            vocabulary = parse_class_names(args.texts, graph_file=graph_file)
        except ValueError as e:
            logger.error("Invalid --texts: %s", e)
            return 2
        log_vocabulary(vocabulary)
    elif args.input:
        logger.error("--input needs --texts (%s)", TEXTS_HELP)
        return 2

    # accelerate's process state: a single process unless started by `accelerate launch`
    # (or torchrun), in which case each process takes a share of the images. Without a GPU,
    # or with --device cpu, the processes share the CPU (gloo on this machine).
    on_cpu = not torch.cuda.is_available() or (args.device or "").startswith("cpu")
    state = PartialState(cpu=on_cpu)
    if state.num_processes > 1 and not args.input:
        logger.error("The interactive mode runs in one process; pass --input to split images "
                     "across the %d processes.", state.num_processes)
        return 2
    if args.input and not _any_input_exists(args.input, Path(args.output)):
        return 1
    device = args.device
    if device is None and state.num_processes > 1:
        # One device per process: its own GPU, or the CPU.
        device = str(state.device)
    try:
        predictor = Predictor(args.config, opts=args.opts, weights=args.weights,
                              device=device)
    except (FileNotFoundError, ValueError, CheckpointMismatchError) as e:
        logger.error("Failed to build the model: %s", e)
        return 2
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    session = DemoSession(
        predictor=predictor, output_dir=output_dir, vocabulary=vocabulary,
        sliding_window=args.sliding_window, bands=args.bands,
        probabilities=args.probabilities, overwrite=args.overwrite,
    )
    if args.input:
        failed = run_batch(session, args.input, state)
    else:
        failed = run_interactive(session, graph_file)
    if not predictor.has_weights:
        logger.warning("These results come from RANDOM weights; pass --weights for real ones.")
    return 1 if failed else 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main(build_parser().parse_args()))
