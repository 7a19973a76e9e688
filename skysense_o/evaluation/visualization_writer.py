"""An evaluator that writes a colour map and an overlay with a legend for every image."""

import logging
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from PIL import Image

from ..utils.image_io import read_image
from ..utils.visualization import add_legend, colorize, draw_segmentation, legend_entries

logger = logging.getLogger(__name__)


def save_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as a PNG through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


class VisualizationWriter(DatasetEvaluator):
    """Writes ``<stem>_color.png`` (the predicted classes, with a legend) and
    ``<stem>_overlay.png`` (the prediction over the image, with a legend) into
    ``output_dir/visualizations``. The legends list the classes present in the prediction."""

    def __init__(self, dataset_name: str, output_dir: str, *, alpha: float = 0.5):
        self._class_names: List[str] = list(MetadataCatalog.get(dataset_name).stuff_classes)
        self._folder = Path(output_dir) / "visualizations"
        self._alpha = alpha

    def reset(self) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            names = list(input_dict.get("texts") or self._class_names)
            prediction = output["sem_seg"]
            # Models with INFERENCE.OUTPUT "labels" return the H x W label map itself.
            if prediction.dim() == 3:
                prediction = prediction.argmax(dim=0)
            labels = prediction.cpu().numpy().astype(np.int64)
            image = read_image(input_dict["file_name"])
            if image.shape[:2] != labels.shape:
                image = np.asarray(Image.fromarray(image).resize(labels.shape[::-1]))
            stem = Path(input_dict["file_name"]).stem
            entries = legend_entries(labels, names)
            colour = add_legend(colorize(labels, names), [n for n, _ in entries],
                                [c for _, c in entries])
            save_png_atomic(colour, self._folder / f"{stem}_color.png")
            save_png_atomic(draw_segmentation(image, labels, names, alpha=self._alpha),
                            self._folder / f"{stem}_overlay.png")

    def evaluate(self):
        logger.info("Wrote prediction pictures to %s", self._folder)
        return None
