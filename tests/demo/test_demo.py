"""Tests of the command-line demo (demo/demo.py) on the real sample images."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from PIL import Image

import demo
from predictor import Prediction, Predictor, Vocabulary
from skysense_o.utils.image_io import read_image
from skysense_o.utils.visualization import class_palette

from . import TINY_OPTS, save_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ["building", "road", "water", "tree"]
# The GeoTIFFs are about 1000 pixels wide, so they are resized to 64 to 96 pixels for speed.
SMALL_INPUT_OPTS = ("INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96")
DEMO_IMAGES = ("neon_osbs_029.png", "neon_soap_031.png", "oem_adelaide_2.tif", "oem_koeln_50.tif")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("weights") / "random.pth")


def _arguments(checkpoint, output, *extra, texts=",".join(NAMES), opts=()):
    argv = ["--output", str(output), "--weights", str(checkpoint), "--device", "cpu"]
    if texts is not None:
        argv += ["--texts", texts]
    argv += list(extra)
    argv += ["--opts", *TINY_OPTS, *SMALL_INPUT_OPTS, *opts]
    return demo.build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    opts = [*TINY_OPTS, *SMALL_INPUT_OPTS]
    return Predictor(opts=opts, weights=str(checkpoint), device="cpu")


def _session(predictor, output, **options):
    """A demo session with the four test names, writing into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    return demo.DemoSession(predictor=predictor, output_dir=output,
                            vocabulary=Vocabulary(NAMES, [[] for _ in NAMES]), **options)


@pytest.fixture(scope="module")
def demo_run(checkpoint, samples_dir, tmp_path_factory):
    """Run the demo once on the sample folder; return (exit status, output folder)."""
    output = tmp_path_factory.mktemp("demo_output")
    status = demo.main(_arguments(checkpoint, output, "--input", str(samples_dir / "demo")))
    return status, output


def _write_crop(source: Path, target: Path, size: int = 80) -> Path:
    Image.fromarray(read_image(source)[:size, :size]).save(target)
    return target


def _legend_colors(picture: np.ndarray, image_width: int) -> set:
    """The colours in the legend panel, which starts right of the image."""
    panel = picture[:, image_width:].reshape(-1, 3)
    return {tuple(int(c) for c in color) for color in np.unique(panel, axis=0)}


def _temporary_files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- the sample folder -----------------------------------------------------------------------


def test_demo_folder_writes_every_output(demo_run):
    status, output = demo_run
    assert status == 0
    for name in DEMO_IMAGES:
        stem, suffix = name.rsplit(".", 1)
        label_suffix = "tif" if suffix == "tif" else "png"
        for kind in (f"labels.{label_suffix}", "color.png", "overlay.png", "classes.json"):
            assert (output / f"{stem}_{kind}").is_file(), f"{stem}_{kind}"
    assert len(list(output.iterdir())) == 4 * len(DEMO_IMAGES)
    assert _temporary_files(output) == []


def test_label_png_and_classes_json(demo_run, samples_dir):
    _, output = demo_run
    labels = np.asarray(Image.open(output / "neon_osbs_029_labels.png"))
    assert labels.shape == read_image(samples_dir / "demo" / "neon_osbs_029.png").shape[:2]
    assert labels.dtype == np.uint8
    assert labels.max() < len(NAMES)
    classes = json.loads((output / "neon_osbs_029_classes.json").read_text(encoding="utf-8"))
    assert classes["classes"] == {str(i): name for i, name in enumerate(NAMES)}
    assert classes["present"] == {str(v): NAMES[v] for v in np.unique(labels).tolist()}
    assert classes["weights"].endswith("random.pth")


@pytest.mark.parametrize("stem", ["oem_adelaide_2", "oem_koeln_50"])
def test_geotiff_keeps_georeferencing(demo_run, samples_dir, stem):
    _, output = demo_run
    with rasterio.open(samples_dir / "demo" / f"{stem}.tif") as source, \
            rasterio.open(output / f"{stem}_labels.tif") as result:
        assert result.crs == source.crs
        assert result.transform == source.transform
        assert (result.width, result.height) == (source.width, source.height)
        assert result.count == 1
        assert result.dtypes[0] == "uint8"
        assert json.loads(result.tags()["CLASS_NAMES"]) == NAMES
        labels = result.read(1)
        assert result.colormap(1)[0] == (*class_palette(NAMES)[0], 255)
    assert labels.max() < len(NAMES)
    classes = json.loads((output / f"{stem}_classes.json").read_text(encoding="utf-8"))
    assert classes["present"] == {str(v): NAMES[v] for v in np.unique(labels).tolist()}


@pytest.mark.parametrize("kind", ["color", "overlay"])
def test_legends_list_present_classes(demo_run, kind):
    _, output = demo_run
    labels = np.asarray(Image.open(output / "neon_soap_031_labels.png"))
    picture = np.asarray(Image.open(output / f"neon_soap_031_{kind}.png").convert("RGB"))
    assert picture.shape[0] >= labels.shape[0]
    assert picture.shape[1] > labels.shape[1]
    palette = class_palette(NAMES)
    present = {palette[value] for value in np.unique(labels).tolist()}
    assert _legend_colors(picture, labels.shape[1]) & set(palette) == present


def test_legend_leaves_out_absent_classes(checkpoint, samples_dir, tmp_path, monkeypatch):
    source = _write_crop(samples_dir / "demo" / "neon_osbs_029.png", tmp_path / "crop.png")
    labels = np.zeros((80, 80), dtype=np.uint8)
    labels[40:] = 2

    def fixed_prediction(self, image, class_names, **kwargs):
        return Prediction(labels=labels, class_names=list(class_names))

    monkeypatch.setattr(Predictor, "predict", fixed_prediction)
    output = tmp_path / "out"
    assert demo.main(_arguments(checkpoint, output, "--input", str(source))) == 0

    palette = class_palette(NAMES)
    for kind in ("color", "overlay"):
        picture = np.asarray(Image.open(output / f"crop_{kind}.png").convert("RGB"))
        assert _legend_colors(picture, 80) & set(palette) == {palette[0], palette[2]}
    classes = json.loads((output / "crop_classes.json").read_text(encoding="utf-8"))
    assert classes["present"] == {"0": "building", "2": "water"}


# ---- text modes, inputs and failures ----------------------------------------------------------


def test_invalid_texts_exit_with_usage_error(checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        status = demo.main(_arguments(checkpoint, tmp_path / "out", "--input", "x.png",
                                      texts="road,,water"))
    assert status == 2
    assert "'road,,water'" in caplog.text
    assert not (tmp_path / "out").exists()


def test_missing_weights_exit_with_usage_error(samples_dir, tmp_path, caplog):
    missing = tmp_path / "absent.pth"
    source = _write_crop(samples_dir / "demo" / "neon_osbs_029.png", tmp_path / "crop.png")
    with caplog.at_level(logging.ERROR):
        status = demo.main(_arguments(missing, tmp_path / "out", "--input", str(source)))
    assert status == 2
    assert "absent.pth" in caplog.text
    assert "not found" in caplog.text


def test_no_existing_input_stops_before_model(tmp_path, caplog, monkeypatch):
    def fail_to_build(*args, **kwargs):
        raise AssertionError("the model must not be built when no input exists")

    monkeypatch.setattr(demo, "Predictor", fail_to_build)
    with caplog.at_level(logging.ERROR):
        status = demo.main(_arguments(tmp_path / "absent.pth", tmp_path / "out", "--input",
                                      str(tmp_path / "typo.png"), str(tmp_path / "*.tif")))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    assert status == 1
    assert any("typo.png" in e and "not found" in e for e in errors)
    assert any("*.tif" in e and "matches no image file" in e for e in errors)
    assert "check the --input paths" in errors[-1]
    assert not (tmp_path / "out").exists()


def test_benchmark_texts_reach_the_outputs(checkpoint, samples_dir, tmp_path):
    source = _write_crop(samples_dir / "demo" / "neon_soap_031.png", tmp_path / "crop.png")
    status = demo.main(_arguments(checkpoint, tmp_path / "out", "--input", str(source),
                                  texts="potsdam_dataset,solar panel"))
    assert status == 0
    classes = json.loads((tmp_path / "out" / "crop_classes.json").read_text(encoding="utf-8"))
    assert list(classes["classes"].values()) == [
        "impervious surfaces", "building", "low vegetation", "tree", "car", "clutter",
        "solar panel",
    ]


def test_bad_images_are_skipped_and_reported(checkpoint, samples_dir, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_crop(samples_dir / "demo" / "neon_osbs_029.png", folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 20)
    _write_crop(samples_dir / "demo" / "neon_soap_031.png", folder / "large.png", size=300)
    missing = tmp_path / "missing.png"
    output = tmp_path / "out"

    with caplog.at_level(logging.ERROR):
        status = demo.main(_arguments(checkpoint, output, "--probabilities", "--input",
                                      str(folder), str(missing),
                                      opts=("INPUT.MAX_IMAGE_PIXELS", "40000")))
    assert status == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert any("corrupt.png" in e and "not an image" in e for e in errors)
    assert any("large.png" in e and "90,000 pixels" in e for e in errors)
    assert any("missing.png" in e and "not found" in e for e in errors)

    assert sorted(p.name for p in output.iterdir()) == [
        "good_classes.json", "good_color.png", "good_labels.png", "good_overlay.png",
        "good_probabilities.tif",
    ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dataset = rasterio.open(output / "good_probabilities.tif")
    with dataset:
        probabilities = dataset.read()
        assert dataset.descriptions == tuple(NAMES)
    labels = np.asarray(Image.open(output / "good_labels.png"))
    assert probabilities.shape == (4, 80, 80)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), labels)


def test_existing_outputs_are_kept(predictor, samples_dir, tmp_path, caplog):
    source = _write_crop(samples_dir / "demo" / "neon_osbs_029.png", tmp_path / "crop.png")
    output = tmp_path / "out"
    session = _session(predictor, output)
    assert demo.run_batch(session, [str(source)]) == 0
    classes = output / "crop_classes.json"
    classes.write_text("edited", encoding="utf-8")
    (output / "crop_color.png").unlink()

    with caplog.at_level(logging.INFO):
        assert demo.run_batch(session, [str(source)]) == 0
    assert classes.read_text(encoding="utf-8") == "edited"
    assert (output / "crop_color.png").is_file()
    assert "keeping existing crop_classes.json" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert demo.run_batch(session, [str(source)]) == 0
    assert "Skipped" in caplog.text
    assert "--overwrite" in caplog.text
    assert classes.read_text(encoding="utf-8") == "edited"

    session.overwrite = True
    assert demo.run_batch(session, [str(source)]) == 0
    assert json.loads(classes.read_text(encoding="utf-8"))["classes"]["0"] == "building"
    assert _temporary_files(output) == []


def test_failed_prediction_leaves_no_partial_file(predictor, samples_dir, tmp_path,
                                                  monkeypatch, caplog):
    source = _write_crop(samples_dir / "demo" / "neon_osbs_029.png", tmp_path / "crop.png")
    original = Predictor.predict_rows

    def fail_halfway(self, image, class_names, emit_rows, **kwargs):
        def emit_then_fail(row_start, row_end, scores):
            emit_rows(row_start, row_end, scores)
            raise MemoryError("simulated out of memory")
        return original(self, image, class_names, emit_then_fail, **kwargs)

    monkeypatch.setattr(Predictor, "predict_rows", fail_halfway)
    output = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        failed = demo.run_batch(_session(predictor, output, probabilities=True), [str(source)])
    assert failed == 1
    assert "simulated out of memory" in caplog.text
    assert list(output.iterdir()) == []


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(OSError):
        with demo.atomic_path(target) as temporary:
            temporary.write_text("half", encoding="utf-8")
            raise OSError("disk full")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_collect_inputs_expands_patterns(tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for name in ("a.png", "b.TIF", "notes.txt", "nested/c.jpg"):
        (images / name).write_bytes(b"")
    output = images / "out"
    output.mkdir()
    (output / "a_color.png").write_bytes(b"")

    files, errors = demo.collect_inputs(
        [str(images), str(images / "**" / "*.jpg"), str(images / "a.png"),
         str(output / "*.png"), str(images / "*.gif")],
        output,
    )
    assert [p.name for p in files] == ["a.png", "b.TIF", "c.jpg"]
    assert len(errors) == 2
    assert "out/*.png" in errors[0]
    assert "*.gif" in errors[1]


def test_same_stem_is_reported(predictor, samples_dir, tmp_path, caplog):
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _write_crop(samples_dir / "demo" / "neon_osbs_029.png", first / "tile.png")
    _write_crop(samples_dir / "demo" / "neon_soap_031.png", second / "tile.png")
    session = _session(predictor, tmp_path / "out")
    with caplog.at_level(logging.ERROR):
        failed = demo.run_batch(session, [str(first / "tile.png"), str(second / "tile.png")])
    assert failed == 1
    assert (tmp_path / "out" / "tile_labels.png").is_file()
    assert "same file stem 'tile'" in caplog.text
    assert str(first / "tile.png") in caplog.text


# ---- interactive mode ---------------------------------------------------------------------------


def test_interactive_mode_reads_stdin(checkpoint, samples_dir, tmp_path):
    source = _write_crop(samples_dir / "demo" / "neon_osbs_029.png", tmp_path / "crop.png")
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "demo" / "demo.py"), "--output", str(output),
               "--weights", str(checkpoint), "--device", "cpu",
               "--opts", *TINY_OPTS, *SMALL_INPUT_OPTS]
    # A single name without a comma is one class; an empty line ends the session.
    stdin = f"water body\n{source}\n{tmp_path / 'absent.png'}\n\n"
    completed = subprocess.run(command, input=stdin, capture_output=True, text=True,
                               timeout=240, cwd=tmp_path, env=dict(os.environ))
    assert completed.returncode == 1, completed.stderr
    assert "Class names" in completed.stdout
    assert "Image path" in completed.stdout
    assert "absent.png" in completed.stderr
    assert "not found" in completed.stderr
    classes = json.loads((output / "crop_classes.json").read_text(encoding="utf-8"))
    assert classes["classes"] == {"0": "water body"}
    labels = np.asarray(Image.open(output / "crop_labels.png"))
    assert labels.shape == (80, 80)
    assert set(np.unique(labels).tolist()) == {0}


# ---- several processes ------------------------------------------------------------------------


class TwoProcessState:
    """Stands in for accelerate's PartialState as process ``index`` of two."""

    num_processes = 2

    def __init__(self, index):
        self.process_index = index
        self.is_main_process = index == 0

    def split_between_processes(self, items):
        # The first process takes the first half (rounded up), as accelerate does.
        half = (len(items) + 1) // 2
        share = items[:half] if self.is_main_process else items[half:]
        return _Share(share)


class _Share:
    def __init__(self, items):
        self.items = items

    def __enter__(self):
        return self.items

    def __exit__(self, *exc_info):
        return False


def test_processes_share_images_and_agree_on_stems(predictor, samples_dir, tmp_path, caplog):
    # Two files share the stem "tile". Whichever process gets the second one must reject it,
    # and each image is written by exactly one process.
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    sources = [
        _write_crop(samples_dir / "demo" / "neon_osbs_029.png", inputs / "a" / "tile.png"),
        _write_crop(samples_dir / "demo" / "neon_soap_031.png", inputs / "a" / "other.png"),
        _write_crop(samples_dir / "demo" / "neon_soap_031.png", inputs / "b" / "tile.png"),
    ]
    patterns = [str(path) for path in sources]
    failures = []
    with caplog.at_level(logging.INFO):
        for index in (0, 1):
            session = _session(predictor, tmp_path / "out")
            failures.append(demo.run_batch(session, patterns, TwoProcessState(index)))

    assert failures == [0, 1]
    written = sorted(path.name for path in (tmp_path / "out").glob("*_labels.png"))
    assert written == ["other_labels.png", "tile_labels.png"]
    assert "same file stem 'tile'" in caplog.text
    assert "by process 0 of 2: 2 images written" in caplog.text
    assert "by process 1 of 2: 0 images written, 0 skipped, 1 failed" in caplog.text


def test_torchrun_splits_images_across_processes(checkpoint, samples_dir, tmp_path):
    # A real two-process launch on this machine (gloo on the loopback interface): each
    # process segments one of the two images.
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in DEMO_IMAGES[:2]:
        _write_crop(samples_dir / "demo" / name, inputs / name)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(REPO_ROOT / "demo" / "demo.py"), "--input", str(inputs),
               "--texts", ",".join(NAMES), "--output", str(output),
               "--weights", str(checkpoint), "--opts", *TINY_OPTS, *SMALL_INPUT_OPTS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               cwd=tmp_path, env=env)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "by process 0 of 2: 1 images written" in completed.stderr
    assert "by process 1 of 2: 1 images written" in completed.stderr
    for name in DEMO_IMAGES[:2]:
        assert (output / f"{Path(name).stem}_labels.png").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
