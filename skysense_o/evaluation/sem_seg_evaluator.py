"""Semantic-segmentation evaluation: confusion matrix, metrics, and a majority-class baseline.

The metrics follow Detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC, per-class IoU and
accuracy, all in percent). One change makes the report clearer: a class that neither occurs in
the ground truth nor is predicted has no defined IoU, so it is reported as absent and left out
of every mean, and the log names it. A class that is predicted but absent from the ground truth
keeps IoU 0 and counts in mIoU, as in Detectron2.

Every number comes from one (N+1) x (N+1) confusion matrix, so ``metrics_from_confusion`` serves
the evaluator, the distributed gather and ``majority_baseline`` alike.
"""

import json
import logging
import math
import os
import re
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image
from tabulate import tabulate

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# The metadata value ``evaluator_type`` that selects ``OpenVocabSemSegEvaluator``.
EVALUATOR_TYPE = "skysense_sem_seg"
# Label value that marks unlabelled pixels when the dataset's metadata sets no ``ignore_label``.
DEFAULT_IGNORE_LABEL = 255
# How many class names or label values a log line or an error lists before it gives a count.
_SHOWN_NAMES = 20


@dataclass(frozen=True)
class SemSegMetrics:
    """Semantic-segmentation metrics of one confusion matrix, in percent.

    ``iou[i]`` is None for an absent class (no ground-truth and no predicted pixel), and
    ``acc[i]`` is None for every class without ground-truth pixels. The four means are NaN when
    no labelled pixel was evaluated.
    """

    class_names: Tuple[str, ...]
    miou: float
    fwiou: float
    macc: float
    pacc: float
    iou: Tuple[Optional[float], ...]
    acc: Tuple[Optional[float], ...]
    gt_pixels: Tuple[int, ...]
    pred_pixels: Tuple[int, ...]
    ignored_pixels: int

    @property
    def absent_classes(self) -> List[str]:
        """Names of the classes left out of the means, in class order."""
        return [name for name, value in zip(self.class_names, self.iou) if value is None]

    def to_results(self) -> Dict[str, float]:
        """Return the flat dict that Detectron2's ``print_csv_format`` expects.

        Keys: "mIoU", "fwIoU", "mACC", "pACC", then "IoU-<class>" for every class with a defined
        IoU and "ACC-<class>" for every class with ground-truth pixels. All values are floats.
        """
        results = {"mIoU": self.miou, "fwIoU": self.fwiou, "mACC": self.macc, "pACC": self.pacc}
        for name, value in zip(self.class_names, self.iou):
            if value is not None:
                results[f"IoU-{name}"] = value
        for name, value in zip(self.class_names, self.acc):
            if value is not None:
                results[f"ACC-{name}"] = value
        return results

    def to_json(self) -> Dict[str, Any]:
        """Return a JSON-ready dict: the means (null when undefined) and one entry per class.

        A class entry contains "name", "iou", "acc" (null when undefined), "gt_pixels",
        "pred_pixels" and "status": "evaluated", "not_in_gt" (predicted only) or "absent".
        """
        per_class = []
        for index, name in enumerate(self.class_names):
            if self.iou[index] is None:
                status = "absent"
            elif self.acc[index] is None:
                status = "not_in_gt"
            else:
                status = "evaluated"
            per_class.append(
                {
                    "name": name,
                    "iou": self.iou[index],
                    "acc": self.acc[index],
                    "gt_pixels": self.gt_pixels[index],
                    "pred_pixels": self.pred_pixels[index],
                    "status": status,
                }
            )
        return {
            "mIoU": _finite_or_none(self.miou),
            "fwIoU": _finite_or_none(self.fwiou),
            "mACC": _finite_or_none(self.macc),
            "pACC": _finite_or_none(self.pacc),
            "num_classes": len(self.class_names),
            "absent_classes": self.absent_classes,
            "ignored_pixels": self.ignored_pixels,
            "per_class": per_class,
        }


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _check_confusion(conf: np.ndarray, num_classes: int) -> np.ndarray:
    conf = np.asarray(conf)
    expected = (num_classes + 1, num_classes + 1)
    if conf.shape != expected:
        raise ValueError(
            f"confusion matrix has shape {conf.shape}, expected {expected} for {num_classes} "
            "classes (one extra row for ignored ground-truth pixels)"
        )
    if not np.issubdtype(conf.dtype, np.integer) or (conf < 0).any():
        raise ValueError("confusion matrix must hold non-negative integer pixel counts")
    return conf.astype(np.int64)


def metrics_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> SemSegMetrics:
    """Compute Detectron2's semantic-segmentation metrics from a confusion matrix.

    Args:
        conf: (N+1) x (N+1) integer pixel counts; ``conf[g, p]`` counts pixels with ground truth
            ``g`` predicted as ``p``. Row N counts ignored ground-truth pixels, which no metric
            uses, and column N is unused because predictions are class indices.
        class_names: the N class names, in index order.

    Returns:
        The metrics in percent. mIoU averages IoU over the classes with ground-truth or
        predicted pixels, mACC averages accuracy over the classes with ground-truth pixels,
        fwIoU weights IoU by ground-truth pixel share, and pACC is the fraction of labelled
        pixels predicted correctly.
    """
    num_classes = len(class_names)
    conf = _check_confusion(conf, num_classes)

    # Only pixels with a class label count, so row N (the ignored pixels) is left out.
    labelled = conf[:num_classes, :num_classes].astype(np.float64)
    true_positives = np.diag(labelled)
    gt_pixels = labelled.sum(axis=1)
    pred_pixels = labelled.sum(axis=0)
    union = gt_pixels + pred_pixels - true_positives
    in_gt = gt_pixels > 0
    evaluated = union > 0

    iou = np.full(num_classes, np.nan)
    acc = np.full(num_classes, np.nan)
    iou[evaluated] = true_positives[evaluated] / union[evaluated]
    acc[in_gt] = true_positives[in_gt] / gt_pixels[in_gt]

    total = gt_pixels.sum()
    if total > 0:
        miou = float(iou[evaluated].mean())
        macc = float(acc[in_gt].mean())
        fwiou = float((iou[in_gt] * gt_pixels[in_gt]).sum() / total)
        pacc = float(true_positives.sum() / total)
    else:
        logger.warning("No labelled ground-truth pixel was evaluated, so every metric is NaN.")
        miou = macc = fwiou = pacc = float("nan")

    return SemSegMetrics(
        class_names=tuple(class_names),
        miou=100.0 * miou,
        fwiou=100.0 * fwiou,
        macc=100.0 * macc,
        pacc=100.0 * pacc,
        iou=tuple(100.0 * float(v) if e else None for v, e in zip(iou, evaluated)),
        acc=tuple(100.0 * float(v) if g else None for v, g in zip(acc, in_gt)),
        gt_pixels=tuple(int(v) for v in gt_pixels),
        pred_pixels=tuple(int(v) for v in pred_pixels),
        ignored_pixels=int(conf[num_classes].sum()),
    )


def confusion_from_labels(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int
) -> np.ndarray:
    """Count (ground truth, prediction) pixel pairs of one image.

    Args:
        gt: H x W ground-truth labels, each a class index or ``ignore_label``.
        pred: H x W predicted class indices.
        num_classes: N.
        ignore_label: the ground-truth value of unlabelled pixels.

    Returns:
        (N+1) x (N+1) int64 matrix in the layout of ``metrics_from_confusion``.
    """
    assert gt.shape == pred.shape, (gt.shape, pred.shape)
    size = num_classes + 1
    gt_rows = np.where(gt == ignore_label, num_classes, gt).astype(np.int64)
    flat = gt_rows.reshape(-1) * size + pred.reshape(-1).astype(np.int64)
    return np.bincount(flat, minlength=size * size).reshape(size, size)


def validate_labels(
    labels: np.ndarray, num_classes: int, ignore_label: Optional[int], source: str
) -> None:
    """Raise ValueError when a label value is neither a class index nor ``ignore_label``."""
    invalid = (labels < 0) | (labels >= num_classes)
    if ignore_label is not None:
        invalid &= labels != ignore_label
    if invalid.any():
        values = np.unique(labels[invalid])
        shown = ", ".join(str(int(v)) for v in values[:_SHOWN_NAMES])
        allowed = f"0..{num_classes - 1}"
        if ignore_label is not None:
            allowed += f" or the ignore label {ignore_label}"
        raise ValueError(
            f"{source}: invalid label value(s) {shown} ({int(invalid.sum())} pixels); "
            f"expected {allowed}. Check that the label file matches the dataset's class list."
        )


def read_label(path: PathLike) -> np.ndarray:
    """Read a single-channel label image (8- or 16-bit PNG, or palette PNG) as int64 H x W."""
    try:
        with PathManager.open(str(path), "rb") as handle:
            image = Image.open(handle)
            image.load()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"ground-truth label file {path} not found") from error
    except OSError as error:
        raise ValueError(f"ground-truth label file {path} could not be read: {error}") from error
    if image.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(
            f"ground-truth label file {path} has mode {image.mode}; expected a single-channel "
            "image of class indices. Convert colour-coded masks to index PNGs first."
        )
    return np.asarray(image, dtype=np.int64)


def label_histogram(
    label_files: Iterable[PathLike], num_classes: int, ignore_label: int = DEFAULT_IGNORE_LABEL
) -> np.ndarray:
    """Count the ground-truth pixels of each class over label files.

    Args:
        label_files: single-channel label images whose values are class indices or
            ``ignore_label``.
        num_classes: N.
        ignore_label: the value of unlabelled pixels, which are not counted.

    Returns:
        int64 vector of length N: the labelled pixels of each class.
    """
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    for path in label_files:
        labels = read_label(path)
        validate_labels(labels, num_classes, ignore_label, str(path))
        rows = np.where(labels == ignore_label, num_classes, labels)
        counts += np.bincount(rows.reshape(-1), minlength=num_classes + 1)
    return counts[:num_classes]


def majority_class_confusion(gt_histogram_eval: np.ndarray, majority_index: int) -> np.ndarray:
    """Build the confusion matrix of predicting one class on every labelled pixel.

    Args:
        gt_histogram_eval: length-N vector of ground-truth pixels per class in the evaluation
            set (as ``label_histogram`` returns).
        majority_index: the class predicted everywhere.

    Returns:
        (N+1) x (N+1) int64 confusion matrix for ``metrics_from_confusion``. Its ignored row is
        empty because ignored pixels do not change any metric.
    """
    histogram = np.asarray(gt_histogram_eval)
    if histogram.ndim != 1 or not np.issubdtype(histogram.dtype, np.integer):
        raise ValueError(
            "gt_histogram_eval must be a 1-D vector of integer pixel counts, got shape "
            f"{histogram.shape} and dtype {histogram.dtype}"
        )
    if (histogram < 0).any():
        raise ValueError("gt_histogram_eval contains a negative pixel count")
    num_classes = histogram.size
    if not 0 <= majority_index < num_classes:
        raise ValueError(
            f"majority_index {majority_index} is not a class index (0..{num_classes - 1})"
        )
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    conf[:num_classes, majority_index] = histogram
    return conf


def majority_baseline(
    train_histogram: np.ndarray, eval_histogram: np.ndarray, class_names: Sequence[str]
) -> SemSegMetrics:
    """Score the baseline that predicts the most frequent training class on every pixel.

    A model that beats this baseline has learned more than the class prior. The numbers come
    from ``metrics_from_confusion``, as the evaluator's do, so the two compare directly.

    Args:
        train_histogram: length-N ground-truth pixels per class of the training set.
        eval_histogram: length-N ground-truth pixels per class of the evaluation set.
        class_names: the N class names.

    Returns:
        The baseline's metrics on the evaluation set.
    """
    train_histogram = np.asarray(train_histogram)
    num_classes = len(class_names)
    named_histograms = (("train_histogram", train_histogram), ("eval_histogram", eval_histogram))
    for name, histogram in named_histograms:
        if np.shape(histogram) != (num_classes,):
            raise ValueError(
                f"{name} has shape {np.shape(histogram)}, expected ({num_classes},): one pixel "
                "count per class name"
            )
    if train_histogram.sum() <= 0:
        raise ValueError("train_histogram counts no pixel, so there is no majority class")

    majority_index = int(np.argmax(train_histogram))
    logger.info(
        "Majority-class baseline predicts %r (%.2f%% of the training pixels).",
        class_names[majority_index],
        100.0 * train_histogram[majority_index] / train_histogram.sum(),
    )
    return metrics_from_confusion(
        majority_class_confusion(eval_histogram, majority_index), class_names
    )


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    A reader never sees a partial file, even if the run is killed while writing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file readable by its owner only; give it the permissions any
        # other file of the run gets, as set by the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _safe_file_stem(name: str) -> str:
    """Replace characters that are unsafe in a file name (such as "/") with "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def _check_class_names(class_names: Any, dataset_name: str) -> List[str]:
    if class_names is None:
        raise ValueError(
            f"dataset {dataset_name!r} has no 'stuff_classes' in its metadata; register the "
            "dataset with its class names or pass class_names= to the evaluator"
        )
    names = list(class_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"class names of {dataset_name!r} must be a non-empty list of strings")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"class names of {dataset_name!r} repeat {duplicates}; per-class metrics need "
            "unique names"
        )
    return names


class OpenVocabSemSegEvaluator(DatasetEvaluator):
    """Accumulate a confusion matrix over a dataset and report semantic-segmentation metrics.

    Ground truth for an input dict comes from, in this order: its "sem_seg_file_name" (a
    single-channel PNG at the original image size), its "sem_seg" tensor (H x W), or the
    "sem_seg_file_name" of the dataset record with the same "file_name" in ``DatasetCatalog``.
    Detectron2's ``DatasetMapper`` removes "sem_seg_file_name" at test time and resizes
    "sem_seg", so with that mapper the catalog lookup is what finds the label.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        save_predictions: bool = False,
        class_names: Optional[Sequence[str]] = None,
        ignore_label: Optional[int] = None,
    ):
        """
        Args:
            dataset_name: registered dataset; its metadata gives the defaults below.
            output_dir: folder for the metrics JSON and, with ``save_predictions``, the
                "predictions/" folder. None writes nothing.
            distributed: sum the confusion matrices of all processes before computing metrics.
            save_predictions: write each predicted label map as a PNG named after the image.
            class_names: the N evaluated class names; default: the metadata's stuff_classes.
            ignore_label: ground-truth value of unlabelled pixels; default: the metadata's
                ignore_label, or 255 when the metadata sets none.
        """
        metadata = MetadataCatalog.get(dataset_name)
        if class_names is None:
            class_names = metadata.get("stuff_classes")
        if ignore_label is None:
            ignore_label = metadata.get("ignore_label", DEFAULT_IGNORE_LABEL)
            if ignore_label is None:
                ignore_label = DEFAULT_IGNORE_LABEL

        self._dataset_name = dataset_name
        self._class_names = _check_class_names(class_names, dataset_name)
        self._num_classes = len(self._class_names)
        if 0 <= int(ignore_label) < self._num_classes:
            raise ValueError(
                f"ignore_label {ignore_label} of {dataset_name!r} is also the index of class "
                f"{self._class_names[int(ignore_label)]!r}; choose a value outside "
                f"0..{self._num_classes - 1} (255, or 65535 for more than 255 classes)"
            )
        self._ignore_label = int(ignore_label)
        self._output_dir = output_dir
        self._distributed = distributed
        self._save_predictions = save_predictions
        if save_predictions and not output_dir:
            raise ValueError("save_predictions=True needs an output_dir to write the PNGs into")
        # Filled on first use only, because reading the dataset catalog can be slow.
        self._label_file_by_image: Optional[Dict[str, str]] = None
        self.reset()

    @property
    def confusion_matrix(self) -> np.ndarray:
        """(N+1) x (N+1) int64 counts of this process, rows ground truth, columns prediction."""
        return self._conf_matrix

    def reset(self) -> None:
        size = self._num_classes + 1
        self._conf_matrix = np.zeros((size, size), dtype=np.int64)
        self._num_images = 0
        self._prediction_names: Set[str] = set()

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Add a batch to the confusion matrix.

        Args:
            inputs: the model's input dicts (see the class docstring for the ground truth).
            outputs: dicts whose "sem_seg" is a C x H x W tensor of class scores at the image's
                original size, with C = N (or an H x W integer tensor of class indices).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"got {len(inputs)} inputs but {len(outputs)} outputs")
        for input_dict, output in zip(inputs, outputs):
            source = self._describe_input(input_dict)
            prediction = self._prediction_labels(output, source)
            ground_truth = self._ground_truth(input_dict, source)
            if prediction.shape != ground_truth.shape:
                raise ValueError(
                    f"{source}: prediction size {_format_size(prediction.shape)} differs from "
                    f"ground-truth size {_format_size(ground_truth.shape)}; the model must "
                    "return scores at the image's original size, and the ground truth must "
                    "not be resized (keep 'sem_seg_file_name' in the input dict)"
                )
            self._conf_matrix += confusion_from_labels(
                ground_truth, prediction, self._num_classes, self._ignore_label
            )
            self._num_images += 1
            if self._save_predictions:
                self._write_prediction(prediction, input_dict)

    def evaluate(self) -> Optional["OrderedDict[str, Dict[str, float]]"]:
        """Compute the metrics over every processed image, log them and write the JSON.

        Returns:
            On the main process, ``{"sem_seg": {"mIoU", "fwIoU", "mACC", "pACC", "IoU-<class>",
            "ACC-<class>"}}`` with values in percent (see ``SemSegMetrics.to_results``);
            None on the other processes.
        """
        conf_matrix, num_images = self._conf_matrix, self._num_images
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.all_gather((self._conf_matrix, self._num_images))
            if not comm.is_main_process():
                return None
            conf_matrix = np.sum([conf for conf, _ in gathered], axis=0, dtype=np.int64)
            num_images = sum(count for _, count in gathered)

        metrics = metrics_from_confusion(conf_matrix, self._class_names)
        self._log_metrics(metrics, num_images)
        if self._output_dir:
            self._write_metrics(metrics, num_images)
        return OrderedDict({"sem_seg": metrics.to_results()})

    def _describe_input(self, input_dict: Mapping[str, Any]) -> str:
        for key in ("sem_seg_file_name", "file_name"):
            if input_dict.get(key):
                return str(input_dict[key])
        if "image_id" in input_dict:
            return f"image_id {input_dict['image_id']}"
        return f"image #{self._num_images} of {self._dataset_name!r}"

    def _prediction_labels(self, output: Mapping[str, Any], source: str) -> np.ndarray:
        scores = output.get("sem_seg") if isinstance(output, Mapping) else None
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"{source}: the model output is missing the 'sem_seg' tensor")
        if scores.dim() == 3:
            if scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"{source}: 'sem_seg' scores have {scores.shape[0]} classes but the "
                    f"evaluator has {self._num_classes}; evaluate with the same class list "
                    "as the model was given"
                )
            # Take the argmax on the scores' device (possibly a GPU) and copy only the labels.
            return scores.argmax(dim=0).cpu().numpy()
        if scores.dim() == 2 and not scores.is_floating_point():
            labels = scores.cpu().numpy()
            validate_labels(labels, self._num_classes, None, f"{source} (prediction)")
            return labels
        raise ValueError(
            f"{source}: 'sem_seg' has shape {tuple(scores.shape)} and dtype {scores.dtype}; "
            "expected C x H x W class scores or an H x W integer label map"
        )

    def _ground_truth(self, input_dict: Mapping[str, Any], source: str) -> np.ndarray:
        label_file = input_dict.get("sem_seg_file_name")
        if label_file:
            labels = read_label(label_file)
        elif isinstance(input_dict.get("sem_seg"), torch.Tensor):
            labels = input_dict["sem_seg"].cpu().numpy().astype(np.int64)
        else:
            label_file = self._catalog_label_file(input_dict.get("file_name"))
            if label_file is None:
                raise ValueError(
                    f"{source}: no ground truth; the input dict needs 'sem_seg_file_name' or "
                    f"'sem_seg', or its 'file_name' must be a record of {self._dataset_name!r}"
                )
            labels = read_label(label_file)
        if labels.ndim != 2:
            raise ValueError(f"{source}: ground truth has shape {labels.shape}, expected H x W")
        validate_labels(labels, self._num_classes, self._ignore_label, source)
        return labels

    def _catalog_label_file(self, file_name: Optional[str]) -> Optional[str]:
        if file_name is None:
            return None
        if self._label_file_by_image is None:
            try:
                records = DatasetCatalog.get(self._dataset_name)
            except KeyError:
                records = []
            self._label_file_by_image = {
                record["file_name"]: record["sem_seg_file_name"]
                for record in records
                if "file_name" in record and "sem_seg_file_name" in record
            }
        return self._label_file_by_image.get(file_name)

    def _write_prediction(self, prediction: np.ndarray, input_dict: Mapping[str, Any]) -> None:
        if input_dict.get("file_name"):
            stem = Path(str(input_dict["file_name"])).stem
        else:
            stem = f"image_{input_dict.get('image_id', self._num_images)}"
        name = stem
        suffix = 1
        while name in self._prediction_names:
            # Images from different folders can share a name (LoveDA's Urban/ and Rural/).
            name = f"{stem}_{suffix}"
            suffix += 1
        if name != stem:
            logger.warning("Prediction for %s is saved as %s.png: the name was taken.", stem, name)
        self._prediction_names.add(name)

        # An 8-bit PNG stores class indices up to 254 and keeps 255 free to mean "ignore".
        dtype = np.uint8 if self._num_classes <= 255 else np.uint16
        image = Image.fromarray(prediction.astype(dtype))
        path = Path(self._output_dir) / "predictions" / f"{name}.png"
        _atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))

    def _log_metrics(self, metrics: SemSegMetrics, num_images: int) -> None:
        rows = [
            [name, _format_percent(iou), _format_percent(acc), gt, pred]
            for name, iou, acc, gt, pred in zip(
                metrics.class_names, metrics.iou, metrics.acc, metrics.gt_pixels,
                metrics.pred_pixels,
            )
            if iou is not None
        ]
        # The percentages are already formatted strings. Parsing them back as numbers would
        # drop their trailing zeros ("17.90" to "17.9") and left-align a column holding "-".
        table = tabulate(
            rows, headers=["class", "IoU", "ACC", "GT pixels", "predicted pixels"],
            tablefmt="pipe", disable_numparse=True,
            colalign=("left", "right", "right", "right", "right"),
        )
        logger.info(
            "Per-class results on %s (%d images):\n%s", self._dataset_name, num_images, table
        )

        absent = metrics.absent_classes
        if absent:
            shown = ", ".join(absent[:_SHOWN_NAMES])
            more = f" and {len(absent) - _SHOWN_NAMES} more" if len(absent) > _SHOWN_NAMES else ""
            logger.info(
                "%d of %d classes are absent from both ground truth and prediction and are "
                "excluded from the means: %s%s.",
                len(absent), len(metrics.class_names), shown, more,
            )
        logger.info(
            "Results on %s: mIoU %.2f, fwIoU %.2f, mACC %.2f, pACC %.2f (%d images, %d ignored "
            "pixels).",
            self._dataset_name, metrics.miou, metrics.fwiou, metrics.macc, metrics.pacc,
            num_images, metrics.ignored_pixels,
        )

    def _write_metrics(self, metrics: SemSegMetrics, num_images: int) -> None:
        report = {
            "dataset": self._dataset_name,
            "num_images": num_images,
            "ignore_label": self._ignore_label,
            **metrics.to_json(),
        }
        file_name = f"sem_seg_metrics_{_safe_file_stem(self._dataset_name)}.json"
        path = Path(self._output_dir) / file_name

        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2, allow_nan=False)

        _atomic_write(path, write)
        logger.info("Wrote the metrics of %s to %s.", self._dataset_name, path)


def _format_size(shape: Tuple[int, ...]) -> str:
    return " x ".join(str(int(side)) for side in shape)


def _format_percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


# Maps a dataset's metadata "evaluator_type" to the evaluator class that build_evaluator makes.
EVALUATOR_TYPES: Dict[str, Callable[..., DatasetEvaluator]] = {
    EVALUATOR_TYPE: OpenVocabSemSegEvaluator,
}


def build_evaluator(
    dataset_name: str, output_dir: Optional[str] = None, **kwargs: Any
) -> DatasetEvaluator:
    """Build the evaluator that the dataset's metadata ``evaluator_type`` names.

    Args:
        dataset_name: a registered dataset.
        output_dir: passed to the evaluator.
        kwargs: further keyword arguments of the evaluator (for example save_predictions).

    Raises:
        KeyError: the metadata has no ``evaluator_type`` or one this project does not know.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type not in EVALUATOR_TYPES:
        raise KeyError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; known types: "
            f"{sorted(EVALUATOR_TYPES)}. Set one of them in the dataset's metadata."
        )
    return EVALUATOR_TYPES[evaluator_type](dataset_name, output_dir=output_dir, **kwargs)
