"""Training mapper for datasets with per-image vocabularies (Sky-SA and folder datasets)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

from ...utils.image_io import DEFAULT_MAX_IMAGE_PIXELS, read_image, read_label
from ..datasets.register_skysa import (
    IGNORE_LABEL,
    LABEL_FORMAT_BINARY_MASKS,
    LABEL_FORMAT_INDEX,
    LABEL_IMAGE_SUFFIXES,
)
from ..graph import (
    VisualRelevanceGraph,
    canonical_name,
    load_graph,
    resolve_graph_file,
    validate_sampling_hyper,
)
from ..sampling import sample_texts, unique_names
from . import MAPPER_REGISTRY
from .robust import SkipBadSamples

logger = logging.getLogger(__name__)

MAPPER_NAME = "skysa_semantic"

# Labels travel through the augmentations as uint8 with this value for ignored pixels (the
# Sky-SA file convention), and become int64 with the configured ignore value at the end. So
# an image may have at most this many classes.
AUG_IGNORE = 255
# A binary mask marks its class with this value; any other value means "not this class".
BINARY_MASK_CLASS_VALUE = 1


def find_binary_mask(folder: Path, index: int, class_name: str) -> Path:
    """Find the mask of ``ann_list[index]`` in a folder of per-class binary masks.

    The mask is the file whose stem is the index (``0.png``), else the class name, else the
    class name with spaces replaced by underscores, with any label-image suffix.

    Raises:
        FileNotFoundError: the folder or the mask is missing.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"Binary-mask folder not found: {folder}")
    stems = (str(index), class_name, class_name.replace(" ", "_"))
    for stem in stems:
        for suffix in LABEL_IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{folder} has no mask for class {index} ({class_name!r}); expected a file named "
        f"{index}.png or {class_name}.png"
    )


def read_index_label(
    path: str, num_classes: int, file_ignore: int, max_pixels: Optional[int]
) -> np.ndarray:
    """Read an index label and return it as uint8 with ignored pixels set to AUG_IGNORE.

    Raises:
        ValueError: a value is neither a class index (0..num_classes-1) nor ``file_ignore``.
    """
    raw = read_label(path, max_pixels=max_pixels)
    invalid = (raw >= num_classes) & (raw != file_ignore)
    if invalid.any():
        bad_values = np.unique(raw[invalid])[:5].tolist()
        raise ValueError(
            f"{path} contains label values {bad_values} but its image has only {num_classes} "
            f"classes (values 0..{num_classes - 1}, {file_ignore} = ignore); fix the label or "
            "the image's ann_list."
        )
    label = raw.astype(np.uint8)
    label[raw == file_ignore] = AUG_IGNORE
    return label


def read_binary_masks(
    folder: str, class_names: Sequence[str], shape: Tuple[int, int], max_pixels: Optional[int]
) -> np.ndarray:
    """Build an index label (uint8, AUG_IGNORE where no mask is set) from per-class masks.

    Where masks overlap, the class listed first in ``class_names`` wins, so the result does
    not depend on file order. Pixels that no mask marks are ignored.
    """
    label = np.full(shape, AUG_IGNORE, dtype=np.uint8)
    for index, name in enumerate(class_names):
        mask_path = find_binary_mask(Path(folder), index, name)
        mask = read_label(mask_path, max_pixels=max_pixels)
        if mask.shape != shape:
            raise ValueError(
                f"Mask {mask_path} is {mask.shape[1]} x {mask.shape[0]} but its image is "
                f"{shape[1]} x {shape[0]} (width x height)."
            )
        label[(mask == BINARY_MASK_CLASS_VALUE) & (label == AUG_IGNORE)] = index
    return label


def pad_to(
    image: np.ndarray, label: np.ndarray, size: Tuple[int, int], image_value: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Pad H x W x 3 ``image`` and H x W ``label`` at the bottom and right to ``size`` (h, w)."""
    pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return image, label
    pad_h, pad_w = max(pad_h, 0), max(pad_w, 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=image_value)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=AUG_IGNORE)
    return image, label


def padded_size(
    height: int, width: int, min_size: Tuple[int, int], divisibility: int
) -> Tuple[int, int]:
    """Return the size after padding to at least ``min_size`` and to a multiple of
    ``divisibility`` (no rounding when it is 0)."""
    height, width = max(height, min_size[0]), max(width, min_size[1])
    if divisibility > 0:
        height = -(-height // divisibility) * divisibility
        width = -(-width // divisibility) * divisibility
    return height, width


def label_lookup(class_names: Sequence[str], ignore_value: int) -> np.ndarray:
    """Map each label value k to the position of ``class_names[k]`` in the text list.

    Repeated names (compared by ``canonical_name``) share the position of their first entry.

    Returns:
        int64 array of AUG_IGNORE + 1 entries; entry AUG_IGNORE is ``ignore_value``.
    """
    positions = {canonical_name(n): i for i, n in enumerate(unique_names(class_names))}
    lookup = np.full(AUG_IGNORE + 1, ignore_value, dtype=np.int64)
    for value, name in enumerate(class_names):
        lookup[value] = positions[canonical_name(name)]
    return lookup


class SkySASemanticDatasetMapper:
    """Map a training dict to an augmented image, a label over sampled texts and the texts.

    Steps:

    1. Read the image (``read_image``, honouring INPUT.BANDS and INPUT.MAX_IMAGE_PIXELS) and
       the label (an index PNG, or a folder of binary masks), and check that their sizes match.
    2. Apply the augmentations (resize, category-area-constrained crop, SSD colour jitter,
       flip) to both.
    3. Pad both to the crop size and the size divisibility (image 128, label ignore).
    4. Sample the text list (``skysense_o.data.sampling``) and remap the label to it.

    A sample that fails to load raises FileNotFoundError or ValueError naming the file. In
    training, ``train_net.py`` wraps the mapper in ``SkipBadSamples``, which skips such samples
    up to DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION. Given ``max_bad_sample_fraction``, the mapper
    applies the same rule itself.

    Returns, per dict: ``image`` (uint8 3 x H x W, RGB), ``sem_seg`` (int64 H x W, values
    index ``texts``, ignored pixels hold ``ignore_value``), ``texts`` (list of str),
    ``graph_sampled`` (bool), ``file_name``, ``height`` and ``width`` (the original size).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        ignore_value: int = IGNORE_LABEL,
        pad_size: Tuple[int, int] = (0, 0),
        size_divisibility: int = 0,
        image_pad_value: int = 128,
        text_batch: int = 100,
        sampling_hyper: Sequence[int] = (1, 3, 9, 10),
        graph_files: Optional[Mapping[str, str]] = None,
        vocabularies: Optional[Mapping[str, Sequence[str]]] = None,
        bands: Sequence[int] = (0, 1, 2),
        max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        max_bad_sample_fraction: Optional[float] = None,
    ):
        """
        Args:
            is_train: must be True; this mapper is for training.
            augmentations: Detectron2 augmentations or transforms, applied in order.
            ignore_value: the value of ignored pixels in the output ``sem_seg``.
            pad_size: (h, w) that every output is padded up to ((0, 0): none).
            size_divisibility: pad height and width to a multiple of this (0: none).
            image_pad_value: the image value (0..255) of padded pixels.
            text_batch: names per image (the image's classes, then negatives).
            sampling_hyper: ``[neg_low, neg_high, pos_low, pos_high]`` graph score bounds.
            graph_files: dataset name -> graph file; datasets absent here use vocabularies.
            vocabularies: dataset name -> names to draw negatives from when there is no graph.
            bands: image bands used as R, G, B.
            max_pixels: the largest accepted image (width x height).
            max_bad_sample_fraction: None (the default, and what ``from_config`` gives) lets
                errors propagate. A fraction makes ``__call__`` return None for a failing
                sample, within that budget, as ``SkipBadSamples`` without a dataset does.
        """
        if not is_train:
            raise ValueError(f"{MAPPER_NAME} is a training mapper; use skysense_test for testing")
        if not 0 <= image_pad_value <= 255:
            raise ValueError(f"image_pad_value must be in 0..255, got {image_pad_value}")
        if text_batch < 1:
            raise ValueError(f"text_batch must be a positive integer, got {text_batch}")

        self.augmentations = T.AugmentationList(list(augmentations))
        self.ignore_value = int(ignore_value)
        self.pad_size = (int(pad_size[0]), int(pad_size[1]))
        self.size_divisibility = int(size_divisibility)
        self.image_pad_value = int(image_pad_value)
        self.text_batch = int(text_batch)
        self.sampling_hyper = validate_sampling_hyper(sampling_hyper)
        self.graph_files = dict(graph_files or {})
        self.vocabularies = {k: list(v) for k, v in (vocabularies or {}).items()}
        self.bands = tuple(int(b) for b in bands)
        self.max_pixels = max_pixels
        self._skip_bad_samples = None
        if max_bad_sample_fraction is not None:
            self._skip_bad_samples = SkipBadSamples(
                self.map, max_bad_fraction=max_bad_sample_fraction
            )

        logger.info(f"[{type(self).__name__}] Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        ignore_value = cfg.MODEL.SKYSENSE_O.LOSS.IGNORE_VALUE
        augmentations: List[Union[T.Augmentation, T.Transform]] = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN,
                cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            )
        ]
        pad_size = (0, 0)
        if cfg.INPUT.CROP.ENABLED:
            # The crop runs before remapping, while ignored label pixels are still AUG_IGNORE.
            augmentations.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    AUG_IGNORE,
                )
            )
            if cfg.INPUT.CROP.TYPE == "absolute":
                pad_size = tuple(cfg.INPUT.CROP.SIZE)
        if cfg.INPUT.COLOR_AUG_SSD:
            augmentations.append(ColorAugSSDTransform(img_format="RGB"))
        if cfg.INPUT.RANDOM_FLIP != "none":
            augmentations.append(
                T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                    vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
                )
            )
        graph_files, vocabularies = _negative_sources(
            cfg.DATASETS.TRAIN, cfg.DATASETS.SKYSA.GRAPH_FILE
        )
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "ignore_value": ignore_value,
            "pad_size": pad_size,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "image_pad_value": cfg.INPUT.IMAGE_PAD_VALUE,
            "text_batch": cfg.DATASETS.SKYSA.TEXT_BATCH,
            "sampling_hyper": list(cfg.DATASETS.SKYSA.SAMPLING_HYPER),
            "graph_files": graph_files,
            "vocabularies": vocabularies,
            "bands": list(cfg.INPUT.BANDS),
            "max_pixels": cfg.INPUT.MAX_IMAGE_PIXELS,
        }

    def _read_label(self, dataset_dict: Dict[str, Any], shape: Tuple[int, int]) -> np.ndarray:
        class_names = dataset_dict["class_names"]
        label_path = dataset_dict["sem_seg_file_name"]
        if len(class_names) >= AUG_IGNORE:
            raise ValueError(
                f"{label_path}: {len(class_names)} classes in one image; the training mapper "
                f"supports at most {AUG_IGNORE - 1}."
            )
        label_format = dataset_dict.get("label_format", LABEL_FORMAT_INDEX)
        if label_format == LABEL_FORMAT_BINARY_MASKS:
            return read_binary_masks(label_path, class_names, shape, self.max_pixels)
        if label_format != LABEL_FORMAT_INDEX:
            raise ValueError(
                f"{label_path}: unknown label_format {label_format!r}; expected "
                f"{LABEL_FORMAT_INDEX!r} or {LABEL_FORMAT_BINARY_MASKS!r}"
            )
        file_ignore = dataset_dict.get("ignore_label", IGNORE_LABEL)
        label = read_index_label(label_path, len(class_names), file_ignore, self.max_pixels)
        if label.shape != shape:
            raise ValueError(
                f"Image {dataset_dict['file_name']} is {shape[1]} x {shape[0]} but its label "
                f"{label_path} is {label.shape[1]} x {label.shape[0]} (width x height)."
            )
        return label

    def _graph(self, dataset_name: str) -> Optional[VisualRelevanceGraph]:
        graph_file = self.graph_files.get(dataset_name, "")
        return load_graph(graph_file) if graph_file else None

    def map(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Map one dataset dict (see the class docstring); errors are raised, not skipped."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(
            dataset_dict["file_name"], bands=self.bands, max_pixels=self.max_pixels
        )
        height, width = image.shape[:2]
        label = self._read_label(dataset_dict, (height, width))

        # Augment image and label together, then pad both.
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        target = padded_size(*aug_input.image.shape[:2], self.pad_size, self.size_divisibility)
        image, label = pad_to(aug_input.image, aug_input.sem_seg, target, self.image_pad_value)

        # Sample the texts with a generator drawn from NumPy's global state, which Detectron2
        # seeds per data-loader worker, so runs with the same seed repeat exactly.
        dataset_name = dataset_dict.get("dataset_name", "")
        rng = np.random.default_rng(np.random.randint(np.iinfo(np.int32).max))
        sample = sample_texts(
            dataset_dict["class_names"],
            text_batch=self.text_batch,
            rng=rng,
            graph=self._graph(dataset_name),
            hyper=self.sampling_hyper,
            vocabulary=self.vocabularies.get(dataset_name, ()),
        )
        sem_seg = label_lookup(dataset_dict["class_names"], self.ignore_value)[label]
        return {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "sem_seg": torch.as_tensor(sem_seg),
            "texts": sample.texts,
            "graph_sampled": sample.graph_sampled,
            "file_name": dataset_dict["file_name"],
            "height": height,
            "width": width,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Map one dict; with ``max_bad_sample_fraction`` set, None for a skipped bad sample."""
        if self._skip_bad_samples is None:
            return self.map(dataset_dict)
        return self._skip_bad_samples(dataset_dict)


def _negative_sources(
    dataset_names: Sequence[str], configured_graph: str
) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """Decide, per training dataset, the graph file or the vocabulary negatives come from.

    DATASETS.SKYSA.GRAPH_FILE, when set, serves every dataset; otherwise a dataset's
    ``graph_file`` metadata; otherwise its ``vocabulary`` (or ``stuff_classes``) metadata.
    Graphs are parsed here, so a bad file fails before training starts.
    """
    if configured_graph and not Path(configured_graph).expanduser().is_file():
        raise FileNotFoundError(
            f"DATASETS.SKYSA.GRAPH_FILE = {configured_graph!r} does not exist; set it to a "
            "skysa_graph.jsonl file or to '' to use each dataset's own graph."
        )
    graph_files: Dict[str, str] = {}
    vocabularies: Dict[str, List[str]] = {}
    for name in dataset_names:
        graph_file = resolve_graph_file(name, configured_graph)
        if graph_file:
            graph = load_graph(graph_file)
            graph_files[name] = graph_file
            logger.info("Negatives of %s are sampled from the graph %s.", name, graph)
            continue
        metadata = MetadataCatalog.get(name)
        vocabulary = metadata.get("vocabulary", None) or metadata.get("stuff_classes", None) or []
        vocabularies[name] = list(vocabulary)
        logger.info(
            "Negatives of %s are sampled from its vocabulary of %d names (no graph).",
            name,
            len(vocabularies[name]),
        )
    return graph_files, vocabularies


# The config names this mapper "skysa_semantic", not by its class name, and fvcore's
# Registry.register always uses __name__, so the explicit-name registration is used.
MAPPER_REGISTRY._do_register(MAPPER_NAME, SkySASemanticDatasetMapper)
