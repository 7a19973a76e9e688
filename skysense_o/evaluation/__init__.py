"""Evaluators for open-vocabulary semantic segmentation."""

from .sem_seg_evaluator import (
    EVALUATOR_TYPE,
    EVALUATOR_TYPES,
    OpenVocabSemSegEvaluator,
    SemSegMetrics,
    build_evaluator,
    label_histogram,
    majority_baseline,
    majority_class_confusion,
    metrics_from_confusion,
)
