"""Long training runs: bad samples are skipped within a budget, a non-finite loss or weights stop
the run without touching the last checkpoint, and --resume after a SIGKILL during a checkpoint
save continues from the previous complete checkpoint.

Training runs on the quick-start data (tools/prepare_quickstart.py, written into a temporary
folder) with a tiny model: 64 x 64 crops, batch 1, a narrow decoder and one CPU thread.
"""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_lr_scheduler

import train_net
from skysense_o.checkpoint import SkySenseOCheckpointer
from skysense_o.config import add_skysense_o_config
from skysense_o.data.dataset_mappers.robust import SkipBadSamples, TooManyBadSamplesError
from skysense_o.data.datasets.register_skysa import register_skysa_folder, unregister_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_TRAIN = "skysense_quickstart_train"

# The quick-start config shrunk so that one iteration takes a fraction of a second on a CPU.
TINY_OVERRIDES = [
    "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE", 64,
    "MODEL.SKYSENSE_O.BACKBONE.GUIDANCE_LAYERS", [0, 1],
    "MODEL.SKYSENSE_O.BACKBONE.VISUAL_FINETUNE", "attention",
    "MODEL.SKYSENSE_O.BACKBONE.TEXT_FINETUNE", "attention",
    "MODEL.SKYSENSE_O.DECODER.GUIDANCE_CHANNELS", [8, 8],
    "MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM", 16,
    "MODEL.SKYSENSE_O.DECODER.TEXT_GUIDANCE_DIM", 8,
    "MODEL.SKYSENSE_O.DECODER.APPEARANCE_GUIDANCE_DIM", 8,
    "MODEL.SKYSENSE_O.DECODER.UPSAMPLE_DIMS", [32, 16],
    "MODEL.SKYSENSE_O.DECODER.UPSAMPLE_GUIDANCE_DIMS", [8, 4],
    "MODEL.SKYSENSE_O.DECODER.NUM_LAYERS", 1,
    "MODEL.SKYSENSE_O.DECODER.NUM_HEADS", 2,
    "MODEL.SKYSENSE_O.DECODER.WINDOW_SIZE", 4,
    "MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET", 8,
    "DATASETS.SKYSA.TEXT_BATCH", 8,
    "DATASETS.TEST", (),
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 128,
    "INPUT.CROP.SIZE", (64, 64),
    "SOLVER.IMS_PER_BATCH", 1,
    "SOLVER.MAX_ITER", 6,
    "SOLVER.CHECKPOINT_PERIOD", 2,
    "SOLVER.WARMUP_ITERS", 2,
    "DATALOADER.NUM_WORKERS", 0,
    "TEST.EVAL_PERIOD", 0,
]


# ---- Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_root(samples_dir, tmp_path_factory):
    """A DETECTRON2_DATASETS folder holding the prepared quick-start datasets."""
    root = tmp_path_factory.mktemp("datasets")
    env = dict(os.environ, DETECTRON2_DATASETS=str(root))
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "prepare_quickstart.py"), str(samples_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return root


@pytest.fixture
def one_thread():
    # Several test processes share few cores, and torch's thread pool slows down by an order
    # of magnitude when it competes for them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_name(quickstart_root):
    """The quick-start training folder registered under a fresh name."""
    name = f"test_long_runs_{uuid.uuid4().hex[:8]}"
    register_skysa_folder(name, quickstart_root / "skysense_quickstart" / "train")
    yield name
    unregister_dataset(name)


def tiny_cfg(output_dir: Path, train_name: str = QUICKSTART_TRAIN, *extra):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "quickstart.yaml"))
    cfg.merge_from_list(
        TINY_OVERRIDES + ["DATASETS.TRAIN", (train_name,), "OUTPUT_DIR", str(output_dir),
                          "SEED", 7, *extra]
    )
    return cfg


def read_last_checkpoint(output_dir: Path) -> str:
    return (output_dir / "last_checkpoint").read_text()


def assert_finite_checkpoint(path: Path, iteration: int) -> None:
    """Check that the file loads with weights_only=True and has finite weights of ``iteration``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == iteration
    assert checkpoint["trainer"]["iteration"] == iteration
    assert checkpoint["trainer"]["_trainer"]["optimizer"]["state"]
    for key, value in checkpoint["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def patch_losses(monkeypatch, trainer, change_losses):
    """Pass the model's training losses through ``change_losses(iteration, model, losses)``."""
    model = trainer.model
    forward = model.forward

    def forward_with_change(batched_inputs):
        losses = forward(batched_inputs)
        return change_losses(trainer.iter, model, losses)

    monkeypatch.setattr(model, "forward", forward_with_change)


# ---- Skipping bad samples ----------------------------------------------------------------------


def failing_mapper(bad_names):
    def mapper(dataset_dict):
        if dataset_dict["file_name"] in bad_names:
            raise FileNotFoundError(f"Image file not found: {dataset_dict['file_name']}")
        return dataset_dict
    return mapper


def test_skip_within_budget_then_raise(caplog):
    skip = SkipBadSamples(failing_mapper({"bad.png"}), max_bad_fraction=0.1)
    with caplog.at_level(logging.WARNING):
        assert skip({"file_name": "bad.png"}) is None
    for _ in range(19):
        assert skip({"file_name": "good.png"}) == {"file_name": "good.png"}
    assert skip({"file_name": "bad.png"}) is None

    with pytest.raises(TooManyBadSamplesError) as info:
        skip({"file_name": "bad.png"})

    assert "Skipped training sample bad.png (1 of 1 samples" in caplog.text
    assert (skip.num_bad, skip.num_read) == (3, 22)
    assert "3 of 22 training samples" in str(info.value)
    assert "bad.png" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_replacement_drawn_from_dataset():
    dataset = [{"file_name": name} for name in ("a.png", "b.png", "c.png", "d.png")]
    skip = SkipBadSamples(failing_mapper({"a.png"}), max_bad_fraction=1.0, dataset=dataset)

    replacements = [skip(dataset[0])["file_name"] for _ in range(6)]

    assert set(replacements) <= {"b.png", "c.png", "d.png"}
    assert len(set(replacements)) > 1
    assert (skip.num_bad, skip.num_read) == (6, 12)
    again = SkipBadSamples(failing_mapper({"a.png"}), max_bad_fraction=1.0, dataset=dataset)
    assert [again(dataset[0])["file_name"] for _ in range(6)] == replacements


def test_small_dataset_checked_when_all_read():
    dataset = [{"file_name": name} for name in ("a.png", "b.png", "c.png")]
    skip = SkipBadSamples(failing_mapper({"a.png", "b.png"}), max_bad_fraction=0.5,
                          dataset=dataset)

    # The check starts once 3 samples (the whole dataset) were read, not after 20.
    with pytest.raises(TooManyBadSamplesError, match="more than"):
        for _ in range(10):
            skip(dataset[0])
    assert 3 <= skip.num_read < 20
    assert skip.num_bad > 0.5 * skip.num_read


def test_all_samples_failed_stops_at_full_budget():
    dataset = [{"file_name": name} for name in ("a.png", "b.png", "a.png")]
    skip = SkipBadSamples(failing_mapper({"a.png", "b.png"}), max_bad_fraction=1.0,
                          dataset=dataset)

    with pytest.raises(TooManyBadSamplesError, match="all 3 samples of the dataset have failed"):
        skip(dataset[0])
    assert skip.num_bad == 2


def test_other_errors_not_skipped():
    def broken_mapper(dataset_dict):
        return dataset_dict["sem_seg_file_name"]

    skip = SkipBadSamples(broken_mapper, max_bad_fraction=1.0)

    with pytest.raises(KeyError, match="sem_seg_file_name"):
        skip({"file_name": "a.png"})


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_invalid_fraction_rejected(fraction):
    with pytest.raises(ValueError, match="MAX_BAD_SAMPLE_FRACTION"):
        SkipBadSamples(failing_mapper(set()), max_bad_fraction=fraction)


def add_missing_image(folder: Path, tmp_path: Path) -> Path:
    """Copy a Sky-SA folder's jsonl to ``tmp_path`` with one more record whose image is absent."""
    records = [json.loads(line) for line in (folder / "skysa_dataset.jsonl").read_text().split("\n")
               if line.strip()]
    for record in records:
        record["flickr_url"] = str(folder / record["flickr_url"])
        record["segmentation"] = str(folder / record["segmentation"])
    missing = dict(records[0], flickr_url=str(tmp_path / "lost_tile.png"))
    copy = tmp_path / "with_missing"
    copy.mkdir()
    lines = [json.dumps(record) for record in [*records, missing]]
    (copy / "skysa_dataset.jsonl").write_text("\n".join(lines) + "\n")
    return copy


@pytest.fixture
def train_name_with_missing_image(quickstart_root, tmp_path):
    folder = add_missing_image(quickstart_root / "skysense_quickstart" / "train", tmp_path)
    name = f"test_long_runs_missing_{uuid.uuid4().hex[:8]}"
    register_skysa_folder(name, folder)
    yield name
    unregister_dataset(name)


def test_loader_skips_missing_image(tmp_path, train_name_with_missing_image, caplog):
    cfg = tiny_cfg(tmp_path, train_name_with_missing_image,
                   "DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION", 0.5)
    loader = train_net.Trainer.build_train_loader(cfg)

    with caplog.at_level(logging.WARNING):
        files = [batch[0]["file_name"] for batch, _ in zip(loader, range(26))]

    assert len(files) == 26
    assert not any(name.endswith("lost_tile.png") for name in files)
    assert len(set(files)) == 11
    assert "Skipped training sample" in caplog.text
    assert "lost_tile.png" in caplog.text


def test_loader_stops_above_budget(tmp_path, train_name_with_missing_image):
    cfg = tiny_cfg(tmp_path, train_name_with_missing_image,
                   "DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION", 0.05)
    loader = train_net.Trainer.build_train_loader(cfg)

    # The sampler reads each of the 12 dicts once per epoch, so the missing image fails again
    # in the second epoch at the latest, after the check has started at 12 reads. One failure
    # in 12 to 40 reads is above 5 %.
    with pytest.raises(TooManyBadSamplesError) as info:
        for _batch, _ in zip(loader, range(40)):
            pass
    assert "lost_tile.png" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


# ---- Non-finite values -------------------------------------------------------------------------


def test_nan_loss_stops_run_keeps_checkpoint(tmp_path, train_name, one_thread, monkeypatch):
    trainer = train_net.Trainer(tiny_cfg(tmp_path, train_name))
    trainer.resume_or_load(resume=False)

    def nan_at_iteration_3(iteration, model, losses):
        if iteration == 3:
            losses["loss_sem_seg"] = losses["loss_sem_seg"] * float("nan")
        return losses

    patch_losses(monkeypatch, trainer, nan_at_iteration_3)

    with pytest.raises(FloatingPointError, match=r"Loss became infinite or NaN at iteration=3"):
        trainer.train()

    assert read_last_checkpoint(tmp_path) == "model_0000001.pth"
    assert_finite_checkpoint(tmp_path / "model_0000001.pth", iteration=1)
    assert not (tmp_path / "model_0000003.pth").exists()
    assert not (tmp_path / "model_final.pth").exists()


def test_nan_weights_never_saved(tmp_path, train_name, one_thread, monkeypatch):
    trainer = train_net.Trainer(tiny_cfg(tmp_path, train_name))
    trainer.resume_or_load(resume=False)

    def nan_gradient_at_iteration_3(iteration, model, losses):
        # sqrt(|p - p|) is 0, so the loss stays finite, but its gradient is 0 x inf = NaN. The
        # clipped AdamW step then writes NaN into the weights at the checkpoint iteration.
        if iteration == 3:
            parameter = next(p for p in model.parameters() if p.requires_grad)
            zero = torch.sqrt((parameter - parameter.detach()).abs().sum())
            losses["loss_sem_seg"] = losses["loss_sem_seg"] + zero
        return losses

    patch_losses(monkeypatch, trainer, nan_gradient_at_iteration_3)

    with pytest.raises(FloatingPointError, match="'model_0000003' was not saved") as info:
        trainer.train()

    assert "NaN or infinite" in str(info.value)
    assert read_last_checkpoint(tmp_path) == "model_0000001.pth"
    assert_finite_checkpoint(tmp_path / "model_0000001.pth", iteration=1)
    assert list(tmp_path.glob("model_0000003*")) == []
    assert list(tmp_path.glob(".tmp-*")) == []


def test_resume_continues_weight_average(tmp_path, train_name, one_thread):
    # Stop after iteration 2 of 4 (the checkpoint "model_0000001"), then --resume: the final
    # average must include the two snapshots taken before the stop.
    averaging = ("SOLVER.WEIGHT_AVERAGE.ENABLED", True,
                 "SOLVER.WEIGHT_AVERAGE.START_FRACTION", 0.0, "SOLVER.WEIGHT_AVERAGE.PERIOD", 1)
    first = tmp_path / "first"
    trainer = train_net.Trainer(tiny_cfg(first, train_name, *averaging, "SOLVER.MAX_ITER", 2))
    trainer.resume_or_load(resume=False)
    trainer.train()
    stopped = torch.load(first / "model_final.pth", map_location="cpu", weights_only=True)
    assert int(stopped["weight_average"]["n_averaged"]) == 2

    second = tmp_path / "second"
    second.mkdir()
    (second / "model_0000001.pth").write_bytes((first / "model_0000001.pth").read_bytes())
    (second / "last_checkpoint").write_text("model_0000001.pth")
    trainer = train_net.Trainer(tiny_cfg(second, train_name, *averaging, "SOLVER.MAX_ITER", 4))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    trainer.train()

    final = torch.load(second / "model_final.pth", map_location="cpu", weights_only=True)
    assert int(final["weight_average"]["n_averaged"]) == 4


def test_checkpoint_permissions_follow_umask(tmp_path):
    checkpointer = SkySenseOCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))

    checkpointer.save("model_0000000")

    umask = os.umask(0)
    os.umask(umask)
    for name in ("model_0000000.pth", "last_checkpoint"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# ---- Kill during a checkpoint save, then --resume ----------------------------------------------


# Runs train_net.main as `python train_net.py` would, recording for the test: the file names of
# every training batch (to ORDER_FILE, appended as they come) and, after resume_or_load, the
# start iteration, the learning rates and the optimizer's step counts (to REPORT_FILE). With
# --kill-during-save, the second checkpoint save writes half the file, creates KILL_MARKER and
# hangs, so the test can kill the process mid-save.
DRIVER = '''
import io
import json
import os
import sys
import time

import torch
from detectron2.engine import default_argument_parser

import train_net

kill_during_save = sys.argv[1] == "--kill-during-save"
argv = sys.argv[2:] if kill_during_save else sys.argv[1:]
order_file = os.environ["ORDER_FILE"]
report_file = os.environ["REPORT_FILE"]
marker = os.environ["KILL_MARKER"]

if kill_during_save:
    real_save = torch.save
    saves = []

    def save_half_then_hang(obj, stream, *args, **kwargs):
        saves.append(len(saves))
        if len(saves) < 2:
            return real_save(obj, stream, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        stream.write(buffer.getvalue()[: buffer.tell() // 2])
        stream.flush()
        open(marker, "w").close()
        time.sleep(600)

    torch.save = save_half_then_hang


class RecordingLoader:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            with open(order_file, "a") as stream:
                stream.write(json.dumps([d["file_name"] for d in batch]) + "\\n")
            yield batch


class RecordingTrainer(train_net.Trainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return RecordingLoader(super().build_train_loader(cfg))

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        report = {
            "start_iter": self.start_iter,
            "lrs": [group["lr"] for group in self.optimizer.param_groups],
            "base_lrs": list(self.scheduler.base_lrs),
            "steps": sorted({float(s["step"]) for s in self.optimizer.state.values()}),
        }
        with open(report_file, "w") as stream:
            json.dump(report, stream)


train_net.Trainer = RecordingTrainer
train_net.main(default_argument_parser().parse_args(argv))
'''


def run_driver(tmp_path, quickstart_root, name, *args):
    """Start the driver with its own log, order and report files; returns (process, files).

    Flags come first in ``args``: Detectron2's parser takes everything after the first config
    override as overrides.
    """
    files = {key: tmp_path / f"{name}_{key.lower()}" for key in
             ("ORDER_FILE", "REPORT_FILE", "KILL_MARKER", "LOG")}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, DETECTRON2_DATASETS=str(quickstart_root), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT), **{key: str(path) for key, path in files.items()})
    # The log goes to a file because the child would block on a full pipe that is never read.
    with open(files["LOG"], "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(driver), *args], cwd=tmp_path, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, files


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the driver exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint save started within {timeout_s} s")
        time.sleep(0.2)


def read_order(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_lrs(cfg, base_lrs, iteration: int) -> list:
    """The learning rates of ``iteration`` in an uninterrupted run, from the schedule alone."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(iteration):
        optimizer.step()
        scheduler.step()
    multiplier = optimizer.param_groups[0]["lr"]
    return [base_lr * multiplier for base_lr in base_lrs]


def test_resume_after_kill_during_save(tmp_path, quickstart_root):
    output_dir = tmp_path / "output"
    train_args = [
        "--config-file", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--num-gpus", "0",
        *[str(item) for item in TINY_OVERRIDES], "OUTPUT_DIR", str(output_dir), "SEED", "7",
    ]

    # Checkpoints come after iterations 1 and 3; the second save is killed halfway.
    killed, killed_files = run_driver(tmp_path, quickstart_root, "killed",
                                      "--kill-during-save", *train_args)
    wait_for(killed_files["KILL_MARKER"], killed, killed_files["LOG"], timeout_s=240)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)

    assert read_last_checkpoint(output_dir) == "model_0000001.pth"
    assert not (output_dir / "model_0000003.pth").exists()
    partial = list(output_dir.glob(".tmp-model_0000003.pth-*"))
    assert len(partial) == 1
    assert partial[0].stat().st_size < (output_dir / "model_0000001.pth").stat().st_size
    assert_finite_checkpoint(output_dir / "model_0000001.pth", iteration=1)

    resumed, resumed_files = run_driver(tmp_path, quickstart_root, "resumed", "--resume",
                                        *train_args)
    resumed.wait(timeout=300)
    output = resumed_files["LOG"].read_text()
    assert resumed.returncode == 0, output

    # The run continues after the last complete checkpoint, at the scheduled learning rate and
    # with AdamW's state of two completed steps.
    report = json.loads(resumed_files["REPORT_FILE"].read_text())
    assert report["start_iter"] == 2
    assert "Starting training from iteration 2" in output
    cfg = tiny_cfg(output_dir)
    expected = expected_lrs(cfg, report["base_lrs"], iteration=2)
    assert np.allclose(report["lrs"], expected, rtol=1e-6)
    assert not np.allclose(report["lrs"], expected_lrs(cfg, report["base_lrs"], iteration=0))
    assert report["steps"] == [2.0]
    assert read_last_checkpoint(output_dir) == "model_final.pth"
    assert_finite_checkpoint(output_dir / "model_final.pth", iteration=5)

    # With a fixed SEED the resumed run draws the same sampler seed, and its stream of samples
    # starts again from the beginning of the original run's stream (see build_train_loader).
    killed_order = read_order(killed_files["ORDER_FILE"])
    resumed_order = read_order(resumed_files["ORDER_FILE"])
    assert len(killed_order) == 4
    assert len(resumed_order) == 4
    assert resumed_order == killed_order
