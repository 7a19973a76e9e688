"""train_net.py as users run it: train a few iterations, then evaluate the checkpoint again."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VAL_DATASET = "skysense_quickstart_val_dubai_aerial"

# The quick-start config shrunk so that training and evaluation take seconds on a CPU.
TINY = [
    "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE", "64",
    "MODEL.SKYSENSE_O.BACKBONE.GUIDANCE_LAYERS", "[0,1]",
    "MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM", "16",
    "MODEL.SKYSENSE_O.DECODER.UPSAMPLE_DIMS", "[16,8]",
    "MODEL.SKYSENSE_O.INFERENCE.WINDOW", "64",
    "MODEL.SKYSENSE_O.INFERENCE.STRIDE", "64",
    "DATASETS.SKYSA.TEXT_BATCH", "6",
    "DATASETS.TEST", f"('{VAL_DATASET}',)",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.CROP.SIZE", "(64,64)",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module")
def datasets_root(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    env = dict(os.environ, DETECTRON2_DATASETS=str(root))
    completed = subprocess.run(
        [sys.executable, "tools/prepare_quickstart.py", str(samples_dir)], cwd=REPO_ROOT,
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return root


def run_train_net(datasets_root, output_dir, *arguments):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    command = [sys.executable, "train_net.py", "--config-file", "configs/quickstart.yaml",
               *arguments, *TINY, "OUTPUT_DIR", str(output_dir)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_train_then_eval_only_reproduces_metrics(datasets_root, tmp_path):
    output_dir = tmp_path / "run"

    # Weight averaging over all 3 iterations: model_final must hold the average.
    trained = run_train_net(datasets_root, output_dir, "SOLVER.WEIGHT_AVERAGE.ENABLED", "True",
                            "SOLVER.WEIGHT_AVERAGE.START_FRACTION", "0.0",
                            "SOLVER.WEIGHT_AVERAGE.PERIOD", "1")
    weights = output_dir / "model_final.pth"
    summary = json.loads((output_dir / "results_summary.json").read_text())
    reevaluated = run_train_net(datasets_root, tmp_path / "eval", "--eval-only",
                                "MODEL.WEIGHTS", str(weights))
    again = json.loads((tmp_path / "eval" / "results_summary.json").read_text())

    assert weights.is_file()
    assert (output_dir / "metrics.json").is_file()
    assert "Results across datasets" in trained.stdout + trained.stderr
    assert "majority class" in trained.stdout + trained.stderr
    first = summary[VAL_DATASET]
    second = again[VAL_DATASET]
    for metric in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert first[metric] == pytest.approx(second[metric], abs=1e-9)
    assert first["majority_baseline"]["class"] == "land (unpaved area)"
    pictures = output_dir / "inference" / VAL_DATASET / "visualizations"
    assert sorted(p.name for p in pictures.iterdir()) == [
        "dubai_t1_009_color.png", "dubai_t1_009_overlay.png",
        "dubai_t4_006_color.png", "dubai_t4_006_overlay.png",
    ]
    assert "Results across datasets" in reevaluated.stdout + reevaluated.stderr
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    average = checkpoint["weight_average"]
    assert int(average["n_averaged"]) == 3
    for key, value in checkpoint["model"].items():
        assert torch.equal(average[f"module.{key}"], value), key
    assert "average of 3 weight snapshots" in trained.stdout + trained.stderr


def test_training_reports_skipped_auxiliary_crops(datasets_root, tmp_path):
    output_dir = tmp_path / "run"

    trained = run_train_net(datasets_root, output_dir,
                            "MODEL.SKYSENSE_O.LOSS.REGION_CONTRAST_WEIGHT", "0.4",
                            "MODEL.SKYSENSE_O.LOSS.REGULAR_WEIGHT", "0.4")

    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    fractions = [r["auxiliary_skipped_fraction"] for r in records
                 if "auxiliary_skipped_fraction" in r]
    # 3 iterations of 2 crops each; the last write records the fraction over all of them.
    summary = re.search(r"zero for (\d) of 6 training crops", trained.stdout + trained.stderr)
    assert summary is not None
    assert fractions[-1] == pytest.approx(int(summary.group(1)) / 6)


def test_eval_only_with_label_output_gives_same_metrics(datasets_root, tmp_path):
    trained_dir = tmp_path / "run"
    run_train_net(datasets_root, trained_dir)
    weights = str(trained_dir / "model_final.pth")
    results = {}
    for output in ("probabilities", "labels"):
        run_train_net(datasets_root, tmp_path / output, "--eval-only", "MODEL.WEIGHTS", weights,
                      "MODEL.SKYSENSE_O.INFERENCE.OUTPUT", output)
        summary = json.loads((tmp_path / output / "results_summary.json").read_text())
        results[output] = summary[VAL_DATASET]

    # The label maps are the argmax of the probabilities up to float rounding on near-ties,
    # which may move a few of the 2 images' pixels at most.
    for metric in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert results["labels"][metric] == pytest.approx(results["probabilities"][metric],
                                                          abs=0.01)
    pictures = tmp_path / "labels" / "inference" / VAL_DATASET / "visualizations"
    assert len(list(pictures.glob("*_overlay.png"))) == 2


def test_invalid_output_kind_is_one_line(datasets_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    output_dir = tmp_path / "eval"
    completed = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quickstart.yaml",
         "--eval-only", "MODEL.SKYSENSE_O.INFERENCE.OUTPUT", "label",
         "OUTPUT_DIR", str(output_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "MODEL.SKYSENSE_O.INFERENCE.OUTPUT='label'; expected one of "
        "('probabilities', 'labels')")
    assert not output_dir.exists()


def test_unknown_config_key_is_rejected(datasets_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    completed = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quickstart.yaml",
         "--eval-only", "MODEL.SKYSENSE_O.DECODER.HIDEN_DIM", "8"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        "Invalid command-line override: Unknown config key MODEL.SKYSENSE_O.DECODER.HIDEN_DIM: "
        "MODEL.SKYSENSE_O.DECODER has no key HIDEN_DIM. Did you mean HIDDEN_DIM? The keys are "
        "defined in skysense_o/config.py and Detectron2's detectron2/config/defaults.py."
    )
    assert "Traceback" not in completed.stderr


def test_missing_config_file_is_one_line(tmp_path):
    completed = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", str(tmp_path / "nope.yaml")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        f"Config file {tmp_path / 'nope.yaml'} not found: give a path such as "
        "configs/quickstart.yaml"
    )


def test_eval_only_missing_weights_is_one_line(datasets_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    missing = tmp_path / "model_fnal.pth"
    completed = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quickstart.yaml",
         "--eval-only", "MODEL.WEIGHTS", str(missing), "OUTPUT_DIR", str(tmp_path / "eval")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 1
    assert f"MODEL.WEIGHTS {missing} not found" in completed.stderr
    assert "Traceback" not in completed.stderr

