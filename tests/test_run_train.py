"""Option parsing of run_train.sh, with a stand-in interpreter that records its arguments."""

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_python(tmp_path):
    """An executable that logs each call's arguments and reports no CUDA."""
    log = tmp_path / "calls.log"
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case "$1" in -c) exit 1 ;; esac\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    return script, log


def run(fake, *options):
    script, log = fake
    env = dict(os.environ, PYTHON=str(script))
    completed = subprocess.run(["sh", str(REPO_ROOT / "run_train.sh"), *options], env=env,
                               capture_output=True, text=True, cwd=REPO_ROOT)
    calls = log.read_text().splitlines() if log.exists() else []
    return completed, calls


def test_no_options_runs_quickstart(fake_python):
    completed, calls = run(fake_python)

    assert completed.returncode == 0, completed.stderr
    assert calls[0] == "tools/prepare_quickstart.py"
    train = calls[-1]
    assert train.startswith("train_net.py --config-file configs/quickstart.yaml --num-gpus 0")
    assert "OUTPUT_DIR output/quickstart" in train
    assert "MODEL.DEVICE cpu" in train


def test_options_become_config_overrides(fake_python, tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("{}\n")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")

    completed, calls = run(
        fake_python, "-c", str(config), "-n", "run1", "-v", "0.4", "-r", "0.2", "-s", "2",
        "-t", "50", "-h", "1,2,8,10", "-w", str(weights), "-a", "-d", "-g", "2",
        "--", "SOLVER.MAX_ITER", "7",
    )

    assert completed.returncode == 0, completed.stderr
    assert len(calls) == 1  # no quick-start preparation and no CUDA probe with -g
    train = calls[0]
    for expected in (
        f"--config-file {config}", "--num-gpus 2", "MODEL.SKYSENSE_O.LOSS.REGULAR_WEIGHT 0.4",
        "MODEL.SKYSENSE_O.LOSS.REGION_CONTRAST_WEIGHT 0.2",
        "MODEL.SKYSENSE_O.LOSS.CONTRAST_SCALE 2", "DATASETS.SKYSA.TEXT_BATCH 50",
        "DATASETS.SKYSA.SAMPLING_HYPER [1,2,8,10]", f"MODEL.WEIGHTS {weights}",
        "MODEL.SKYSENSE_O.INFERENCE.RETRIEVAL_AUGMENTATION True",
        "DATALOADER.NUM_WORKERS 1", "TEST.EVAL_PERIOD 20", "OUTPUT_DIR output/run1",
        "SOLVER.MAX_ITER 7",
    ):
        assert expected in train


def test_eval_only_uses_given_weights(fake_python, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")

    completed, calls = run(fake_python, "-e", "-w", str(weights))

    assert completed.returncode == 0, completed.stderr
    assert "--eval-only" in calls[-1]
    assert f"MODEL.WEIGHTS {weights}" in calls[-1]
    assert not any(call.startswith("tools/prepare_quickstart.py") for call in calls)


@pytest.mark.parametrize(
    "options, message",
    [
        (["-x"], "unknown option -x"),
        (["-t"], "option -t needs a value"),
        (["-t", "0"], "text batch '0' (-t) is not a positive integer"),
        (["-v", "abc"], "regulariser weight 'abc' (-v)"),
        (["-s", "0"], "contrast scale '0' (-s) is not a number > 0"),
        (["-h", "1,3,9"], "sampling thresholds '1,3,9' (-h)"),
        (["-h", "0,3,9,10"], "sampling thresholds '0,3,9,10' (-h)"),
        (["-g", "two"], "number of GPUs 'two' (-g)"),
        (["-c", "missing.yaml"], "config file 'missing.yaml' (-c) does not exist"),
        (["-w", "missing.pth"], "weights file 'missing.pth' (-w) does not exist"),
        (["-n", "a/b"], "run name 'a/b' (-n)"),
        (["--", "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
        (["--config", "configs/quickstart.yaml"], "unknown option --config; --help is the only"),
    ],
)
def test_bad_options_stop_with_usage(fake_python, options, message):
    completed, calls = run(fake_python, *options)

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "--help" in completed.stderr
    assert not any(call.startswith("train_net.py") for call in calls)


def test_eval_only_without_weights_fails(fake_python, tmp_path):
    completed, calls = run(fake_python, "-e", "-n", "never-trained-run")

    assert completed.returncode == 2
    assert "-e needs weights" in completed.stderr


def test_help_exits_zero(fake_python):
    completed, _ = run(fake_python, "--help")

    assert completed.returncode == 0
    assert "Usage: sh run_train.sh" in completed.stdout
