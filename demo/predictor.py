"""Segment images with a SkySense-O model from Python, and expand the demo's class-name modes.

``Predictor`` builds a model from a config file and a checkpoint and labels RGB arrays with any
list of class names. It streams its output in blocks of rows, so a sliding-window prediction
never keeps the T x H x W probabilities of a whole image unless the caller asks for them.

``parse_class_names`` turns the demo's ``--texts`` value into a class list. The value contains
comma-separated tokens, and each token is one of:

* ``open_world``: the 218 Sky-SA names of ``datasets/class_lists/open_world.json``, or every node
  of the visual-relevance graph when a graph file is given;
* ``<benchmark>_dataset``: the class list ``datasets/class_lists/<benchmark>.json``, for example
  ``potsdam_dataset`` or ``loveda_dataset``;
* any other text: one free class name, such as ``solar panel``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from skysense_o import add_skysense_o_config
from skysense_o.checkpoint import SkySenseOCheckpointer
from skysense_o.data.datasets.register_benchmarks import CLASS_LISTS_DIR, load_class_list
from skysense_o.data.graph import canonical_name, load_graph
from skysense_o.modeling.inference import (
    RowResizer,
    bilinear_argmax,
    blend_rows_with_view,
    expand_with_synonyms,
    interpolate_rows,
    padded_length,
    sliding_window_scores,
    source_rows,
)
from skysense_o.release import build_model_for_inference
from skysense_o.utils.weights import CheckpointMismatchError

logger = logging.getLogger(__name__)

# The tiny quick-start model; this file sits in <repo>/demo/.
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
OPEN_WORLD = "open_world"
BENCHMARK_SUFFIX = "_dataset"
# The largest class count whose label values fit in uint8 and in uint16.
MAX_UINT8_CLASSES = 255
MAX_UINT16_CLASSES = 65535

# Receives (row_start, row_end, scores): the T x rows x W class probabilities of output rows
# [row_start, row_end), on the model's device.
ScoreRowsCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Prediction:
    """The result of ``Predictor.predict``.

    Attributes:
        labels: H x W class indices into ``class_names``; uint8 for up to 255 classes, else
            uint16.
        class_names: the T class names, in label order.
        probabilities: T x H x W float32 class probabilities, or None unless requested.
    """

    labels: np.ndarray
    class_names: List[str]
    probabilities: Optional[np.ndarray] = None


@dataclass
class Vocabulary:
    """Class names expanded from the demo's text modes, with their synonyms.

    Attributes:
        names: the class names, without duplicates, in the order of the tokens.
        synonyms: per class, the synonyms that its benchmark list gives (empty for the rest).
    """

    names: List[str]
    synonyms: List[List[str]]


# ---- class names ---------------------------------------------------------------------------


def check_class_names(class_names: Sequence[str]) -> List[str]:
    """Check a class list and return it as a list.

    Raises:
        TypeError: ``class_names`` is a single string, or an entry is not a string.
        ValueError: the list is empty, a name is empty or blank, or two names are equal
            ignoring case and repeated white space; the message names the values.
    """
    if isinstance(class_names, str):
        raise TypeError(
            f"class_names must be a list of names, got the string {class_names!r}; "
            "wrap a single name in a list"
        )
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; give at least one class name")
    first_index = {}
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class name {index} is a {type(name).__name__}, not str: {name!r}")
        if not name.strip():
            raise ValueError(f"class name {index} is empty or blank: {name!r}")
        key = canonical_name(name)
        if key in first_index:
            earlier = first_index[key]
            raise ValueError(
                f"class name {index} ({name!r}) repeats class name {earlier} "
                f"({names[earlier]!r}); give each class once"
            )
        first_index[key] = index
    return names


def _available_class_lists(class_lists_dir: Path) -> List[str]:
    return sorted(path.stem for path in class_lists_dir.glob("*.json"))


def _warn_if_mistyped_list(token: str, class_lists_dir: Path) -> None:
    """Warn when a free class name looks like a misspelt ``open_world`` or ``<list>_dataset``."""
    if " " in token or "_" not in token:
        return
    known = [OPEN_WORLD] + [name + BENCHMARK_SUFFIX
                            for name in _available_class_lists(class_lists_dir)]
    close = difflib.get_close_matches(token.casefold(), known, n=1, cutoff=0.8)
    if close:
        logger.warning("%r is used as one class name; did you mean the class list %r?",
                       token, close[0])


def _expand_token(
    token: str, graph_file: str, class_lists_dir: Path
) -> Tuple[List[str], List[List[str]]]:
    """Expand one ``--texts`` token into class names and their synonyms."""
    if token.casefold() == OPEN_WORLD:
        if graph_file:
            names = list(load_graph(graph_file).nodes)
            logger.info("open_world: %d names from the graph %s", len(names), graph_file)
            return names, [[] for _ in names]
        token = OPEN_WORLD + BENCHMARK_SUFFIX
    if not token.casefold().endswith(BENCHMARK_SUFFIX):
        _warn_if_mistyped_list(token, class_lists_dir)
        return [token], [[]]

    benchmark = token[: -len(BENCHMARK_SUFFIX)].casefold()
    try:
        class_list = load_class_list(benchmark, class_lists_dir)
    except FileNotFoundError as e:
        known = [name + BENCHMARK_SUFFIX for name in _available_class_lists(class_lists_dir)]
        raise ValueError(
            f"{token!r} names no class list: {class_lists_dir / (benchmark + '.json')} does "
            f"not exist. Known lists: {', '.join(known)}"
        ) from e
    names = list(class_list.classes)
    synonyms = [list(s) for s in class_list.synonyms] if class_list.synonyms else [[] for _ in names]
    logger.info("%s: %d names from %s", token, len(names), class_list.path)
    return names, synonyms


def parse_class_names(
    text: str, *, graph_file: str = "", class_lists_dir: Optional[Path] = None
) -> Vocabulary:
    """Expand a comma-separated ``--texts`` value (see the module docstring) into class names.

    Tokens are stripped of surrounding white space. A value without a comma is one token, so
    ``"solar panel"`` is the single class "solar panel". Names that repeat an earlier one after
    expansion (equal ignoring case and repeated white space) are removed with a WARNING that
    lists them, and their synonyms join those of the name that is kept. Lists that overlap,
    such as ``potsdam_dataset,vaihingen_dataset``, can so be combined.

    Args:
        text: the value, e.g. ``"building,road"``, ``"open_world"`` or
            ``"potsdam_dataset,solar panel"``.
        graph_file: a ``skysa_graph.jsonl`` file; when set, ``open_world`` means its nodes.
        class_lists_dir: the folder of class lists; default: the repository's
            ``datasets/class_lists``.

    Returns:
        The class names and their synonyms.

    Raises:
        ValueError: the value is empty, a token is blank, or a ``<benchmark>_dataset`` token
            names no class list.
    """
    if not isinstance(text, str):
        raise TypeError(f"class names must be given as a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"no class names given: {text!r}")
    folder = Path(class_lists_dir) if class_lists_dir is not None else CLASS_LISTS_DIR
    names: List[str] = []
    synonyms: List[List[str]] = []
    position = {}
    removed = []
    for index, raw_token in enumerate(text.split(",")):
        token = raw_token.strip()
        if not token:
            raise ValueError(
                f"entry {index + 1} of {text!r} is empty; remove the extra comma or fill in a "
                "class name"
            )
        for name, terms in zip(*_expand_token(token, graph_file, folder)):
            key = canonical_name(name)
            if key in position:
                removed.append(name)
                kept = synonyms[position[key]]
                kept.extend(term for term in terms if term not in kept)
                continue
            position[key] = len(names)
            names.append(name)
            synonyms.append(list(terms))
    if removed:
        logger.warning(
            "Removed %d repeated class names from %r (each kept once): %s",
            len(removed), text, ", ".join(repr(name) for name in removed),
        )
    return Vocabulary(names=names, synonyms=synonyms)


# ---- streaming resize ----------------------------------------------------------------------


# ---- the predictor -------------------------------------------------------------------------


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:<index>'") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved


def load_config(config_file=DEFAULT_CONFIG_FILE, opts: Sequence[str] = ()) -> CfgNode:
    """Read a SkySense-O config file and apply ``opts`` (``["KEY", "VALUE", ...]`` overrides).

    Raises:
        FileNotFoundError: the config file does not exist.
    """
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return cfg


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a NumPy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be an H x W x 3 uint8 RGB array, got shape {image.shape} and dtype "
            f"{image.dtype}; read files with skysense_o.utils.image_io.read_image"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    return image


def label_dtype(num_classes: int) -> np.dtype:
    """Return the smallest unsigned dtype of a label map with ``num_classes`` classes."""
    if num_classes <= MAX_UINT8_CLASSES:
        return np.dtype(np.uint8)
    if num_classes <= MAX_UINT16_CLASSES:
        return np.dtype(np.uint16)
    raise ValueError(f"{num_classes} classes do not fit a uint16 label map (at most 65535)")


class Predictor:
    """Open-vocabulary segmentation of RGB arrays with a SkySense-O model.

    Example::

        predictor = Predictor("configs/quickstart.yaml",
                              weights="output/quickstart/model_final.pth")
        result = predictor.predict(image, ["building", "road", "water"])
        result.labels  # H x W uint8 indices into result.class_names

    The image is first resized as in evaluation (``INPUT.MIN_SIZE_TEST`` and
    ``INPUT.MAX_SIZE_TEST``; a minimum of 0 keeps its size), predicted in the configured
    inference mode, and the scores are mapped back to the input size. Text embeddings are
    cached by the model's text embedder, so repeated calls with the same names encode them once.
    """

    def __init__(
        self,
        config_file=DEFAULT_CONFIG_FILE,
        *,
        opts: Sequence[str] = (),
        weights: Optional[str] = None,
        device: Optional[str] = None,
    ):
        """
        Args:
            config_file: a SkySense-O config (default: the quick-start config).
            opts: config overrides, ``["KEY", "VALUE", ...]``.
            weights: a checkpoint; None uses ``MODEL.WEIGHTS`` of the config. When neither is
                set, the model keeps its random initialisation and a WARNING reports it.
            device: "cpu", "cuda" or "cuda:<index>"; default: "cuda" when available, else "cpu".

        Raises:
            FileNotFoundError: the config file or the checkpoint does not exist.
            ValueError: the device is invalid or unavailable, or the checkpoint is a pickle.
            CheckpointMismatchError: the checkpoint does not match the model built from the
                config (a RuntimeError that names the file and the keys).
        """
        cfg = load_config(config_file, opts)
        cfg.MODEL.DEVICE = str(_resolve_device(device))
        if weights is not None:
            cfg.MODEL.WEIGHTS = str(weights)
        cfg.freeze()
        self.cfg = cfg
        self.weights = cfg.MODEL.WEIGHTS
        self.min_size = cfg.INPUT.MIN_SIZE_TEST
        self.max_size = cfg.INPUT.MAX_SIZE_TEST
        self.bands = tuple(cfg.INPUT.BANDS)
        self.max_image_pixels = cfg.INPUT.MAX_IMAGE_PIXELS
        self.graph_file = cfg.DATASETS.SKYSA.GRAPH_FILE
        self.retrieval_augmentation = cfg.MODEL.SKYSENSE_O.INFERENCE.RETRIEVAL_AUGMENTATION

        if self.weights and not Path(self.weights).is_file():
            raise FileNotFoundError(f"checkpoint {self.weights} not found (--weights)")
        if self.weights and cfg.MODEL.SKYSENSE_O.LOW_MEMORY_LOAD:
            # Built on the meta device with the weight file memory-mapped, so a release-size
            # model needs about one copy of its weights in RAM instead of two.
            try:
                self.model = build_model_for_inference(cfg, self.weights)
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(f"{self.weights}: {e}") from e
        else:
            self.model = build_model(cfg)
        self.model.eval()
        if self.weights and not cfg.MODEL.SKYSENSE_O.LOW_MEMORY_LOAD:
            checkpointer = SkySenseOCheckpointer(
                self.model, strict=cfg.MODEL.SKYSENSE_O.WEIGHTS_STRICT
            )
            try:
                checkpointer.load(self.weights)
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(f"{self.weights}: {e}") from e
        if self.weights:
            logger.info("Loaded weights from %s", self.weights)
        else:
            logger.warning(
                "No weights given: running with RANDOM weights. The predictions are noise; "
                "pass a checkpoint (--weights or MODEL.WEIGHTS), e.g. the quick-start "
                "output/quickstart/model_final.pth written by 'sh run_train.sh'."
            )
        logger.info("Predictor on %s, inference mode %r", cfg.MODEL.DEVICE,
                    self.model.inference_mode)

    @property
    def has_weights(self) -> bool:
        """Whether a checkpoint was loaded (False: random weights)."""
        return bool(self.weights)

    def predict(
        self,
        image: np.ndarray,
        class_names: Sequence[str],
        *,
        synonyms: Optional[Sequence[Sequence[str]]] = None,
        sliding_window: Optional[bool] = None,
        return_probabilities: bool = False,
    ) -> Prediction:
        """Label every pixel of ``image`` with one of ``class_names``.

        Args:
            image: H x W x 3 uint8 RGB array.
            class_names: T class names, each given once.
            synonyms: retrieval augmentation: per class, a list (possibly empty) of other
                names whose scores count for it; the class scores the maximum over them.
            sliding_window: True: windows of ``MODEL.SKYSENSE_O.INFERENCE.WINDOW`` pixels at
                ``STRIDE``; False: one resized view; None: the config's ``INFERENCE.MODE``.
            return_probabilities: also return the T x H x W probabilities (4 bytes per class
                and pixel).

        Returns:
            The label map (uint8 for up to 255 classes, else uint16), the class names and, if
            requested, the probabilities.
        """
        names = check_class_names(class_names)
        pixels = _check_image(image)
        labels = np.empty(pixels.shape[:2], dtype=label_dtype(len(names)))
        probabilities = None
        if return_probabilities:
            probabilities = np.empty((len(names), *pixels.shape[:2]), dtype=np.float32)

        def store(row_start: int, row_end: int, scores: torch.Tensor) -> None:
            labels[row_start:row_end] = scores.argmax(dim=0).cpu().numpy()
            if probabilities is not None:
                probabilities[:, row_start:row_end] = scores.float().cpu().numpy()

        if return_probabilities or self._use_sliding(sliding_window):
            self.predict_rows(pixels, names, store, synonyms=synonyms,
                              sliding_window=sliding_window)
        else:
            # Labels alone from one view: only the classes that can win in each cell of the
            # decoder's grid are interpolated, which matters for thousands of names.
            with torch.no_grad(), self._autocast():
                tensor, text_embeds, synonym_groups = self._prepare(pixels, names, synonyms)
                scores = self._global_scores(tensor, text_embeds, synonym_groups)
                labels[:] = bilinear_argmax(scores, pixels.shape[:2])[0].cpu().numpy()
        return Prediction(labels=labels, class_names=names, probabilities=probabilities)

    def predict_rows(
        self,
        image: np.ndarray,
        class_names: Sequence[str],
        emit_rows: ScoreRowsCallback,
        *,
        synonyms: Optional[Sequence[Sequence[str]]] = None,
        sliding_window: Optional[bool] = None,
    ) -> None:
        """Predict ``image`` and pass its class probabilities on in blocks of rows.

        ``emit_rows(row_start, row_end, scores)`` receives T x rows x W probabilities on the
        model's device for consecutive row ranges that cover the image once, top to bottom.
        In sliding-window mode, scores are averaged on a grid as coarse as the decoder's
        output, and no more than a window's height of its rows is held at a time, so memory
        grows with the window and the image width.

        NOTE: the whole-image mode and the global view (``INFERENCE.GLOBAL_WEIGHT``) also
        keep the normalised image, 3 x H x W float32 at the model's input scale.

        Args:
            image, class_names, synonyms, sliding_window: as in ``predict``.
            emit_rows: the receiver of the rows.
        """
        names = check_class_names(class_names)
        pixels = _check_image(image)
        with torch.no_grad(), self._autocast():
            tensor, text_embeds, synonym_groups = self._prepare(pixels, names, synonyms)
            output_size = tuple(pixels.shape[:2])
            if self._use_sliding(sliding_window):
                self._predict_sliding(tensor, text_embeds, synonym_groups, output_size, emit_rows)
            else:
                self._predict_whole(tensor, text_embeds, synonym_groups, output_size, emit_rows)

    # ---- steps ---------------------------------------------------------------------------------

    def _use_sliding(self, sliding_window: Optional[bool]) -> bool:
        if sliding_window is None:
            return self.model.inference_mode == "sliding"
        return bool(sliding_window)

    def _prepare(self, pixels: np.ndarray, names: Sequence[str], synonyms):
        """Return the resized uint8 image on the model's device, the text embeddings of the
        names and their synonyms, and the synonym groups."""
        model = self.model
        all_names, synonym_groups = expand_with_synonyms(names, synonyms)
        text_embeds = model.text_embedder.embed(model.backbone, all_names)
        resized = self._resize(pixels)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return tensor.to(model.device), text_embeds, synonym_groups

    def _autocast(self):
        # The model's forward runs inference under the same autocast setting.
        if not self.model.amp_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type,
                              dtype=getattr(torch, self.model.amp_dtype))

    def _resize(self, pixels: np.ndarray) -> np.ndarray:
        """Resize as the test mapper does (shortest edge to MIN_SIZE_TEST, long side capped)."""
        if self.min_size <= 0:
            return pixels
        resize = T.ResizeShortestEdge(self.min_size, self.max_size)
        return resize.get_transform(pixels).apply_image(pixels)

    def _global_scores(self, image: torch.Tensor, text_embeds, synonym_groups) -> torch.Tensor:
        """Predict the whole uint8 3 x H x W image as one view, at the decoder's resolution.

        Returns T x h x w probabilities whose bilinear resize to any size equals the model's
        ``whole_scores`` at that size.
        """
        return self.model.whole_source(self.model.normalize(image), text_embeds, synonym_groups)

    def _predict_whole(self, image, text_embeds, synonym_groups, output_size, emit_rows):
        scores = self._global_scores(image, text_embeds, synonym_groups)
        rows = source_rows(scores.shape[1], output_size[0])
        block = max(1, self.model.window)
        for start in range(0, output_size[0], block):
            selected = slice(start, min(start + block, output_size[0]))
            block_rows = tuple(values[selected] for values in rows)
            emit_rows(selected.start, selected.stop,
                      interpolate_rows(scores, 0, block_rows, output_size[1]))

    def _predict_sliding(self, image, text_embeds, synonym_groups, output_size, emit_rows):
        model = self.model
        height, width = image.shape[-2:]
        num_classes = len(synonym_groups) if synonym_groups else text_embeds.shape[0]
        factor = model.sliding_downsample()
        cell = model.window // factor
        source = _pad_for_windows(image, padded_length(height, model.window, factor),
                                  padded_length(width, model.window, factor))

        def predict(crops: torch.Tensor) -> torch.Tensor:
            normalized = model.normalize(crops[:, :3])
            if crops.shape[1] == 4:
                # Padding is zero after normalisation, as in the model's own sliding mode.
                normalized = torch.where(crops[:, 3:4].bool(), normalized, 0.0)
            probs = model.predict_window_scores(normalized, text_embeds, synonym_groups)
            if probs.shape[-2:] == (cell, cell):
                return probs
            return F.interpolate(probs, size=(cell, cell), mode="bilinear", align_corners=False)

        emit = emit_rows
        if model.global_weight > 0:
            emit = blend_rows_with_view(
                self._global_scores(image, text_embeds, synonym_groups),
                model.global_weight, output_size, emit_rows,
            )
        resizer = RowResizer((height, width), output_size, emit)

        def collect(row_start: int, row_end: int, scores: torch.Tensor) -> None:
            # Drop the padding below and to the right of the image.
            row_end = min(row_end, height)
            if row_end > row_start:
                resizer.push(scores[:, : row_end - row_start, :width])

        sliding_window_scores(
            source, predict, num_classes=num_classes, window=model.window,
            stride=model.stride, batch_size=model.window_batch, emit_rows=collect,
            score_downsample=factor, blend=model.window_blend,
        )
        assert resizer.next_row == output_size[0], "the sliding window left rows unset"


def _pad_for_windows(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return the 3 x h x w ``image`` as 1 x C x ``height`` x ``width``.

    An image of that size is returned as 1 x 3 x h x w. A smaller one is padded at the bottom
    and right and gets a fourth channel that is 1 on image pixels, so the window predictor can
    zero the padding after normalising.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image[None]
    padded = image.new_zeros(1, 4, height, width)
    padded[0, :3, : image.shape[-2], : image.shape[-1]] = image
    padded[0, 3, : image.shape[-2], : image.shape[-1]] = 1
    return padded
