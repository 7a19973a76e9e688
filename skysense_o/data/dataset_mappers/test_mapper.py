"""Test mapper: read and resize an image and attach the class names it is segmented with."""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from ...utils.image_io import DEFAULT_MAX_IMAGE_PIXELS, read_image
from . import MAPPER_REGISTRY

logger = logging.getLogger(__name__)

MAPPER_NAME = "skysense_test"


class SkySenseTestDatasetMapper:
    """Map a test dict to a resized image, its original size and its class names.

    The class names are the dataset's ``stuff_classes`` metadata, or the dict's own
    ``class_names`` when the dataset has no fixed vocabulary. The dataset is the dict's
    ``dataset_name``, else the one given to the mapper.

    Returns, per dict: ``image`` (uint8 3 x H x W, RGB, resized so that its short side is
    ``min_size`` and its long side at most ``max_size``; unresized when ``min_size`` is 0),
    ``height`` and ``width`` (the original size), ``texts`` (list of str), ``synonyms`` (when
    the metadata has them: per class, a list of str), ``file_name`` and, when the dict has
    one, ``sem_seg_file_name``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = False,
        *,
        min_size: int,
        max_size: int,
        bands: Sequence[int] = (0, 1, 2),
        max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        dataset_name: Optional[str] = None,
    ):
        """
        Args:
            is_train: must be False; this mapper is for testing.
            min_size: the short side after resizing (INPUT.MIN_SIZE_TEST); 0: no resize.
            max_size: the longest allowed long side (INPUT.MAX_SIZE_TEST).
            bands: image bands used as R, G, B.
            max_pixels: the largest accepted image (width x height).
            dataset_name: the dataset of dicts without a ``dataset_name`` key.
        """
        if is_train:
            raise ValueError(f"{MAPPER_NAME} is a test mapper; use skysa_semantic for training")
        self.resize = T.ResizeShortestEdge(min_size, max_size) if min_size > 0 else None
        self.bands = tuple(int(b) for b in bands)
        self.max_pixels = max_pixels
        self.dataset_name = dataset_name

    @classmethod
    def from_config(
        cls, cfg, is_train: bool = False, dataset_name: Optional[str] = None
    ) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "min_size": cfg.INPUT.MIN_SIZE_TEST,
            "max_size": cfg.INPUT.MAX_SIZE_TEST,
            "bands": list(cfg.INPUT.BANDS),
            "max_pixels": cfg.INPUT.MAX_IMAGE_PIXELS,
            "dataset_name": dataset_name,
        }

    def _texts_and_synonyms(
        self, dataset_dict: Dict[str, Any]
    ) -> tuple[List[str], Optional[List[List[str]]]]:
        dataset_name = dataset_dict.get("dataset_name") or self.dataset_name
        metadata = MetadataCatalog.get(dataset_name) if dataset_name else None
        stuff_classes = metadata.get("stuff_classes", None) if metadata is not None else None
        if stuff_classes:
            texts = list(stuff_classes)
        elif dataset_dict.get("class_names"):
            texts = list(dataset_dict["class_names"])
        else:
            raise KeyError(
                f"No class names for {dataset_dict.get('file_name')}: dataset "
                f"{dataset_name!r} has no stuff_classes metadata and the dict has no "
                "class_names. Register the dataset with its classes."
            )

        synonyms = metadata.get("synonyms", None) if metadata is not None else None
        if synonyms is None:
            return texts, None
        if len(synonyms) != len(texts):
            raise ValueError(
                f"Dataset {dataset_name!r}: the synonyms metadata has {len(synonyms)} entries "
                f"but there are {len(texts)} classes; give one list of synonyms per class."
            )
        return texts, [list(s) for s in synonyms]

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Map one test dict (see the class docstring)."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], bands=self.bands, max_pixels=self.max_pixels)
        height, width = image.shape[:2]
        if self.resize is not None:
            image = self.resize.get_transform(image).apply_image(image)
        texts, synonyms = self._texts_and_synonyms(dataset_dict)

        result = {
            "image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
            "height": height,
            "width": width,
            "texts": texts,
            "file_name": dataset_dict["file_name"],
        }
        if synonyms is not None:
            result["synonyms"] = synonyms
        if "sem_seg_file_name" in dataset_dict:
            result["sem_seg_file_name"] = dataset_dict["sem_seg_file_name"]
        return result


# The config and train_net name this mapper "skysense_test", not by its class name, and
# fvcore's Registry.register always uses __name__, so the explicit-name registration is used.
MAPPER_REGISTRY._do_register(MAPPER_NAME, SkySenseTestDatasetMapper)
