"""Tests of the semantic-segmentation evaluator against hand-computed confusion matrices."""

import json
import logging
import uuid
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import print_csv_format
from PIL import Image

from skysense_o.evaluation import sem_seg_evaluator as evaluator_module
from skysense_o.evaluation.sem_seg_evaluator import (
    EVALUATOR_TYPE,
    OpenVocabSemSegEvaluator,
    build_evaluator,
    confusion_from_labels,
    label_histogram,
    majority_baseline,
    majority_class_confusion,
    metrics_from_confusion,
)

# Four classes: "water" is predicted but never in the ground truth, "tree" is in neither.
CLASS_NAMES = ["building", "road", "water", "tree"]
IGNORE = 255
GT = np.array(
    [
        [0, 0, 0, 1],
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        [IGNORE, IGNORE, 1, 1],
    ]
)
PRED = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 1, 1, 0],
        [2, 2, 1, 1],
    ]
)
# Worked by hand from GT and PRED (rows ground truth, columns prediction, last row ignored).
EXPECTED_CONF = np.array(
    [
        [4, 1, 1, 0, 0],
        [1, 7, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 2, 0, 0],
    ]
)
# building: TP 4, GT 6, predicted 5, union 7. road: TP 7, GT 8, predicted 8, union 9.
# water: TP 0, union 1. Labelled pixels: 14.
EXPECTED = {
    "mIoU": 100 * (4 / 7 + 7 / 9 + 0) / 3,
    "fwIoU": 100 * (6 * 4 / 7 + 8 * 7 / 9) / 14,
    "mACC": 100 * (4 / 6 + 7 / 8) / 2,
    "pACC": 100 * 11 / 14,
    "IoU-building": 100 * 4 / 7,
    "IoU-road": 100 * 7 / 9,
    "IoU-water": 0.0,
    "ACC-building": 100 * 4 / 6,
    "ACC-road": 100 * 7 / 8,
}


def one_hot_scores(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Return C x H x W scores whose argmax is ``labels``."""
    scores = torch.zeros((num_classes,) + labels.shape)
    scores.scatter_(0, torch.as_tensor(labels, dtype=torch.long)[None], 1.0)
    return scores


def write_label(path: Path, labels: np.ndarray) -> str:
    Image.fromarray(labels.astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def dataset_name() -> Iterator[str]:
    """A metadata entry with this test's class names, removed afterwards."""
    name = f"test_sem_seg_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(
        stuff_classes=CLASS_NAMES, ignore_label=IGNORE, evaluator_type=EVALUATOR_TYPE
    )
    yield name
    MetadataCatalog.remove(name)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)


def run_evaluator(evaluator, gt_files: List[str], predictions: List[np.ndarray]):
    evaluator.reset()
    for gt_file, prediction in zip(gt_files, predictions):
        evaluator.process(
            [{"file_name": gt_file.replace(".png", ".jpg"), "sem_seg_file_name": gt_file}],
            [{"sem_seg": one_hot_scores(prediction, len(CLASS_NAMES))}],
        )
    return evaluator.evaluate()


def test_confusion_from_labels_hand_case():
    conf = confusion_from_labels(GT, PRED, len(CLASS_NAMES), IGNORE)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, EXPECTED_CONF)


def test_metrics_from_confusion_hand_case():
    metrics = metrics_from_confusion(EXPECTED_CONF, CLASS_NAMES)
    results = metrics.to_results()
    assert set(results) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    assert metrics.absent_classes == ["tree"]
    assert metrics.iou[3] is None
    assert metrics.acc[2] is None
    assert metrics.gt_pixels == (6, 8, 0, 0)
    assert metrics.pred_pixels == (5, 8, 1, 0)
    assert metrics.ignored_pixels == 2


def test_metrics_from_confusion_rejects_bad_matrix():
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*\(5, 5\)"):
        metrics_from_confusion(np.zeros((4, 4), dtype=np.int64), CLASS_NAMES)
    with pytest.raises(ValueError, match="non-negative integer"):
        metrics_from_confusion(np.full((5, 5), 0.5), CLASS_NAMES)


def test_metrics_without_labelled_pixels_are_nan():
    conf = np.zeros((5, 5), dtype=np.int64)
    conf[4, 0] = 10
    metrics = metrics_from_confusion(conf, CLASS_NAMES)
    assert np.isnan(metrics.miou)
    assert np.isnan(metrics.pacc)
    assert metrics.absent_classes == CLASS_NAMES
    assert metrics.to_json()["mIoU"] is None


def test_evaluator_hand_case(tmp_path, dataset_name, caplog):
    gt_file = write_label(tmp_path / "tile.png", GT)
    evaluator = OpenVocabSemSegEvaluator(dataset_name, output_dir=str(tmp_path / "eval"))
    with caplog.at_level(logging.INFO, logger=evaluator_module.__name__):
        results = run_evaluator(evaluator, [gt_file], [PRED])

    assert list(results) == ["sem_seg"]
    metrics = results["sem_seg"]
    assert list(metrics)[:4] == ["mIoU", "fwIoU", "mACC", "pACC"]
    assert set(metrics) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)
    assert "1 of 4 classes are absent" in caplog.text
    assert "tree" in caplog.text
    # The per-class table keeps two decimals and right-aligns "-" (water has no GT pixels).
    water_row = next(line for line in caplog.text.splitlines() if line.startswith("| water"))
    assert [cell.strip() for cell in water_row.strip("|").split("|")][:3] == [
        "water", "0.00", "-"]
    assert f"| {EXPECTED['IoU-building']:.2f} |" in caplog.text
    print_csv_format(results)


def test_evaluator_writes_same_numbers_to_json(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    output_dir = tmp_path / "eval"
    evaluator = OpenVocabSemSegEvaluator(dataset_name, output_dir=str(output_dir))
    results = run_evaluator(evaluator, [gt_file], [PRED])["sem_seg"]

    report = json.loads((output_dir / f"sem_seg_metrics_{dataset_name}.json").read_text())
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert report[key] == pytest.approx(results[key], abs=1e-12), key
    per_class = {entry["name"]: entry for entry in report["per_class"]}
    assert per_class["building"]["iou"] == pytest.approx(results["IoU-building"])
    assert per_class["road"]["acc"] == pytest.approx(results["ACC-road"])
    assert per_class["water"]["iou"] == 0.0
    assert per_class["water"]["acc"] is None
    assert per_class["water"]["status"] == "not_in_gt"
    assert per_class["tree"]["iou"] is None
    assert per_class["tree"]["status"] == "absent"
    assert report["absent_classes"] == ["tree"]
    assert report["num_images"] == 1
    assert report["ignored_pixels"] == 2
    assert [p.name for p in output_dir.iterdir()] == [f"sem_seg_metrics_{dataset_name}.json"]


def test_ignored_pixels_do_not_count(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    other_pred = PRED.copy()
    other_pred[GT == IGNORE] = 3
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    results = run_evaluator(evaluator, [gt_file], [other_pred])["sem_seg"]
    assert results["mIoU"] == pytest.approx(EXPECTED["mIoU"])
    assert results["pACC"] == pytest.approx(EXPECTED["pACC"])
    # "tree" is predicted only on ignored pixels, so it stays absent.
    assert "IoU-tree" not in results
    assert evaluator.confusion_matrix[4, 3] == 2


def test_invalid_gt_value_names_file_and_value(tmp_path, dataset_name):
    bad = GT.copy()
    bad[0, 0] = 7
    gt_file = write_label(tmp_path / "bad_label.png", bad)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    with pytest.raises(ValueError, match=r"bad_label\.png.*invalid label value\(s\) 7"):
        run_evaluator(evaluator, [gt_file], [PRED])


def test_size_mismatch_names_file_and_sizes(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    message = r"tile\.png.*prediction size 4 x 3.*ground-truth size 4 x 4"
    with pytest.raises(ValueError, match=message):
        run_evaluator(evaluator, [gt_file], [PRED[:, :3]])


def test_wrong_number_of_score_channels_raises(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    with pytest.raises(ValueError, match="3 classes but the evaluator has 4"):
        evaluator.process(
            [{"sem_seg_file_name": gt_file}], [{"sem_seg": one_hot_scores(PRED, 3)[:3]}]
        )


def test_missing_label_file_raises(tmp_path, dataset_name):
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        evaluator.process([{"sem_seg_file_name": missing}], [{"sem_seg": one_hot_scores(PRED, 4)}])


def test_rgb_label_file_raises(tmp_path, dataset_name):
    path = tmp_path / "colour.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    with pytest.raises(ValueError, match=r"colour\.png has mode RGB"):
        evaluator.process(
            [{"sem_seg_file_name": str(path)}], [{"sem_seg": one_hot_scores(PRED, 4)}]
        )


def test_ground_truth_from_sem_seg_tensor(dataset_name):
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    evaluator.process(
        [{"file_name": "tile.jpg", "sem_seg": torch.as_tensor(GT)}],
        [{"sem_seg": one_hot_scores(PRED, 4)}],
    )
    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)


def test_ground_truth_from_dataset_catalog(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    image_file = str(tmp_path / "tile.jpg")
    DatasetCatalog.register(
        dataset_name, lambda: [{"file_name": image_file, "sem_seg_file_name": gt_file}]
    )
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    evaluator.process([{"file_name": image_file}], [{"sem_seg": one_hot_scores(PRED, 4)}])
    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)
    with pytest.raises(ValueError, match="other.jpg: no ground truth"):
        evaluator.process([{"file_name": "other.jpg"}], [{"sem_seg": one_hot_scores(PRED, 4)}])


def test_integer_label_map_prediction(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    evaluator.process([{"sem_seg_file_name": gt_file}], [{"sem_seg": torch.as_tensor(PRED)}])
    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)
    with pytest.raises(ValueError, match=r"\(prediction\).*invalid label value\(s\) 9"):
        evaluator.process(
            [{"sem_seg_file_name": gt_file}], [{"sem_seg": torch.full((4, 4), 9)}]
        )


def test_save_predictions_writes_pngs(tmp_path, dataset_name):
    gt_file = write_label(tmp_path / "tile.png", GT)
    output_dir = tmp_path / "eval"
    evaluator = OpenVocabSemSegEvaluator(
        dataset_name, output_dir=str(output_dir), save_predictions=True
    )
    evaluator.process(
        [
            {"file_name": "/a/tile.jpg", "sem_seg_file_name": gt_file},
            {"file_name": "/b/tile.jpg", "sem_seg_file_name": gt_file},
        ],
        [{"sem_seg": one_hot_scores(PRED, 4)}, {"sem_seg": one_hot_scores(GT % IGNORE, 4)}],
    )
    written = sorted(p.name for p in (output_dir / "predictions").iterdir())
    assert written == ["tile.png", "tile_1.png"]
    first = np.asarray(Image.open(output_dir / "predictions" / "tile.png"))
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, PRED)


def test_save_predictions_uses_16_bits_above_255_classes(tmp_path, dataset_name):
    names = [f"class {i}" for i in range(300)]
    labels = np.array([[0, 299], [256, 1]])
    evaluator = OpenVocabSemSegEvaluator(
        dataset_name,
        output_dir=str(tmp_path),
        save_predictions=True,
        class_names=names,
        ignore_label=65535,
    )
    evaluator.process(
        [{"file_name": "big.tif", "sem_seg": torch.as_tensor(labels)}],
        [{"sem_seg": one_hot_scores(labels, 300)}],
    )
    saved = np.asarray(Image.open(tmp_path / "predictions" / "big.png"))
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, labels)


def test_save_predictions_needs_output_dir(dataset_name):
    with pytest.raises(ValueError, match="output_dir"):
        OpenVocabSemSegEvaluator(dataset_name, save_predictions=True)


def test_gathered_matrices_equal_single_run(tmp_path, dataset_name, monkeypatch):
    second_gt = np.array([[2, 2, 3, 3], [2, 2, 3, 3], [0, 0, 1, 1], [0, 0, 1, IGNORE]])
    second_pred = np.array([[2, 3, 3, 3], [2, 2, 3, 0], [0, 0, 1, 1], [1, 0, 1, 1]])
    files = [
        write_label(tmp_path / "first.png", GT),
        write_label(tmp_path / "second.png", second_gt),
    ]
    single = OpenVocabSemSegEvaluator(dataset_name, distributed=False)
    expected = run_evaluator(single, files, [PRED, second_pred])

    # Each of two "processes" evaluates one image, and the gather hands both matrices over.
    rank0 = OpenVocabSemSegEvaluator(dataset_name)
    rank1 = OpenVocabSemSegEvaluator(dataset_name)
    run_evaluator(rank1, files[1:], [second_pred])
    rank0.reset()
    rank0.process(
        [{"sem_seg_file_name": files[0]}], [{"sem_seg": one_hot_scores(PRED, len(CLASS_NAMES))}]
    )
    gathered = [(rank0.confusion_matrix, 1), (rank1.confusion_matrix, 1)]
    monkeypatch.setattr(evaluator_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluator_module.comm, "synchronize", lambda: None)
    monkeypatch.setattr(evaluator_module.comm, "all_gather", lambda data: gathered)
    monkeypatch.setattr(evaluator_module.comm, "is_main_process", lambda: True)
    combined = rank0.evaluate()
    assert combined == expected

    monkeypatch.setattr(evaluator_module.comm, "is_main_process", lambda: False)
    assert rank0.evaluate() is None


def test_constructor_defaults_and_checks(dataset_name):
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    assert evaluator._class_names == CLASS_NAMES
    assert evaluator._ignore_label == IGNORE
    with pytest.raises(ValueError, match="ignore_label 2 .* class 'water'"):
        OpenVocabSemSegEvaluator(dataset_name, ignore_label=2)
    with pytest.raises(ValueError, match=r"repeat \['road'\]"):
        OpenVocabSemSegEvaluator(dataset_name, class_names=["road", "water", "road"])
    with pytest.raises(ValueError, match="no 'stuff_classes'"):
        OpenVocabSemSegEvaluator(f"{dataset_name}_unregistered")
    MetadataCatalog.remove(f"{dataset_name}_unregistered")


def test_build_evaluator_by_type(tmp_path, dataset_name):
    evaluator = build_evaluator(dataset_name, str(tmp_path), save_predictions=True)
    assert isinstance(evaluator, OpenVocabSemSegEvaluator)
    assert evaluator._save_predictions

    other = f"{dataset_name}_coco"
    MetadataCatalog.get(other).set(evaluator_type="coco")
    try:
        with pytest.raises(KeyError, match=r"'coco'.*known types.*'skysense_sem_seg'"):
            build_evaluator(other, None)
    finally:
        MetadataCatalog.remove(other)


def test_majority_class_confusion_hand_case():
    conf = majority_class_confusion(np.array([6, 8, 0]), 1)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[:3, 1] = [6, 8, 0]
    np.testing.assert_array_equal(conf, expected)
    with pytest.raises(ValueError, match="majority_index 3"):
        majority_class_confusion(np.array([6, 8, 0]), 3)
    with pytest.raises(ValueError, match="integer pixel counts"):
        majority_class_confusion(np.array([0.5, 1.0]), 0)


def test_majority_baseline_hand_case():
    names = ["building", "road", "tree"]
    metrics = majority_baseline(np.array([10, 30, 5]), np.array([6, 8, 0]), names)
    # "road" wins in training. On evaluation, building IoU 0, road IoU 8/14, tree absent.
    assert metrics.miou == pytest.approx(100 * (0 + 8 / 14) / 2)
    assert metrics.macc == pytest.approx(100 * (0 + 1) / 2)
    assert metrics.pacc == pytest.approx(100 * 8 / 14)
    assert metrics.fwiou == pytest.approx(100 * (8 * 8 / 14) / 14)
    assert metrics.absent_classes == ["tree"]
    with pytest.raises(ValueError, match=r"eval_histogram has shape \(2,\)"):
        majority_baseline(np.array([1, 2, 3]), np.array([1, 2]), names)
    with pytest.raises(ValueError, match="no majority class"):
        majority_baseline(np.array([0, 0, 0]), np.array([1, 2, 3]), names)


def test_majority_baseline_matches_evaluator(tmp_path, dataset_name):
    """The baseline and an evaluator that receives the same constant prediction agree exactly."""
    train = write_label(tmp_path / "train.png", np.array([[1, 1], [1, 0]]))
    evaluation = write_label(tmp_path / "eval.png", GT)
    train_histogram = label_histogram([train], len(CLASS_NAMES), IGNORE)
    eval_histogram = label_histogram([evaluation], len(CLASS_NAMES), IGNORE)
    np.testing.assert_array_equal(train_histogram, [1, 3, 0, 0])
    np.testing.assert_array_equal(eval_histogram, [6, 8, 0, 0])

    baseline = majority_baseline(train_histogram, eval_histogram, CLASS_NAMES)
    evaluator = OpenVocabSemSegEvaluator(dataset_name)
    results = run_evaluator(evaluator, [evaluation], [np.ones_like(GT)])["sem_seg"]
    assert baseline.to_results() == results
