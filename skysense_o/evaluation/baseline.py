"""The majority-class baseline: what predicting the most frequent class everywhere scores."""

import logging
from typing import Dict, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .sem_seg_evaluator import label_histogram, majority_baseline, read_label

logger = logging.getLogger(__name__)


def training_histogram(train_datasets: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Count the labelled pixels of each of ``class_names`` over the training datasets.

    Training images may have their own class lists (the ``class_names`` of a Sky-SA record),
    so pixels are counted by name; names outside ``class_names`` are not counted.
    """
    position = {name: index for index, name in enumerate(class_names)}
    counts = np.zeros(len(class_names), dtype=np.int64)
    for dataset_name in train_datasets:
        metadata = MetadataCatalog.get(dataset_name)
        ignore_label = metadata.get("ignore_label", 255)
        for record in DatasetCatalog.get(dataset_name):
            if record.get("label_format", "index") != "index":
                continue
            names = record.get("class_names") or metadata.get("stuff_classes")
            labels = read_label(record["sem_seg_file_name"]).reshape(-1)
            labels = labels[labels != ignore_label]
            per_index = np.bincount(labels, minlength=len(names))
            for index, name in enumerate(names):
                if name in position:
                    counts[position[name]] += per_index[index]
    return counts


def evaluate_majority_baseline(train_datasets: Sequence[str], eval_dataset: str) -> Dict:
    """Score the majority-class baseline on ``eval_dataset``.

    The majority class is the one of the evaluation dataset's classes with the most labelled
    pixels in ``train_datasets``.

    Returns:
        {"class": the predicted class name, "metrics": the evaluator's summary metrics}.
    """
    metadata = MetadataCatalog.get(eval_dataset)
    class_names = list(metadata.stuff_classes)
    ignore_label = metadata.get("ignore_label", 255)
    label_files = [record["sem_seg_file_name"] for record in DatasetCatalog.get(eval_dataset)]
    eval_counts = label_histogram(label_files, len(class_names), ignore_label)
    train_counts = training_histogram(train_datasets, class_names)
    if train_counts.sum() == 0:
        raise ValueError(
            f"none of the classes of {eval_dataset} ({', '.join(class_names)}) occurs in the "
            f"training datasets {list(train_datasets)}, so there is no majority class"
        )
    metrics = majority_baseline(train_counts, eval_counts, class_names)
    return {
        "class": class_names[int(np.argmax(train_counts))],
        "metrics": metrics.to_results(),
    }
