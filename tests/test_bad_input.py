"""Bad input met by training and loading: each case raises a clear error naming what is wrong.

The readers' own unit tests (tests/utils/test_image_io.py, tests/data/) cover each check in
isolation. Here every case goes through the path a user takes: a registered dataset, the
training loader of train_net.py, the config, or the checkpointer.
"""

import itertools
import json
import logging
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from PIL import Image

import train_net
from skysense_o.checkpoint import SkySenseOCheckpointer
from skysense_o.config import add_skysense_o_config
from skysense_o.data.dataset_mappers import MAPPER_REGISTRY
from skysense_o.data.dataset_mappers.robust import TooManyBadSamplesError
from skysense_o.data.datasets.register_skysa import register_skysa_folder, unregister_dataset
from skysense_o.modeling.backbone import build_vl_backbone
from skysense_o.utils.weights import CheckpointMismatchError
from tests.utils.test_image_io import write_png_with_declared_size, write_tiff

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("road", "water")
IMAGE_SIZE = (6, 8)  # height, width


# ---- Helpers -------------------------------------------------------------------------------


@pytest.fixture
def dataset_name():
    name = f"test_bad_input_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_dataset(name)


def make_skysa_folder(root: Path, image_name: str, label_name: str, classes=CLASSES) -> Path:
    """Write a one-record Sky-SA folder whose files the caller writes afterwards."""
    folder = root / "skysa"
    (folder / "img_dir").mkdir(parents=True)
    (folder / "ann_dir").mkdir()
    records = [
        {
            "flickr_url": f"img_dir/{image_name}",
            "segmentation": f"ann_dir/{label_name}",
            "ann_list": [{"category_name": name} for name in classes],
        }
    ]
    lines = [json.dumps(record) for record in records]
    (folder / "skysa_dataset.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def training_cfg(dataset_name: str, **overrides):
    """A config whose training mapper reads each image unchanged (no resize, crop or jitter)."""
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    options = {
        "DATASETS.TRAIN": (dataset_name,),
        "DATASETS.SKYSA.TEXT_BATCH": 2,
        "DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION": 0.0,
        "INPUT.MIN_SIZE_TRAIN": (0,),
        "INPUT.CROP.ENABLED": False,
        "INPUT.COLOR_AUG_SSD": False,
        "INPUT.RANDOM_FLIP": "none",
        "INPUT.SIZE_DIVISIBILITY": 0,
        "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 1,
    }
    options.update(overrides)
    cfg.merge_from_list([item for pair in options.items() for item in pair])
    return cfg


def save_rgb(path: Path, size=IMAGE_SIZE) -> None:
    data = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(data).save(path)


def save_label(path: Path, size=IMAGE_SIZE, value: int = 0) -> None:
    label = np.zeros(size, dtype=np.uint8)
    label[0, 0] = value
    Image.fromarray(label, mode="L").save(path)


# ---- Bad training samples ----------------------------------------------------------------------


def write_missing_image(image: Path, label: Path) -> None:
    save_label(label)


def write_missing_label(image: Path, label: Path) -> None:
    save_rgb(image)


def write_text_as_image(image: Path, label: Path) -> None:
    image.write_text("this is not an image")
    save_label(label)


def write_truncated_image(image: Path, label: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(data).save(image)
    image.write_bytes(image.read_bytes()[:300])
    save_label(label, size=(64, 64))


def write_label_of_other_size(image: Path, label: Path) -> None:
    save_rgb(image)
    save_label(label, size=(IMAGE_SIZE[0] - 1, IMAGE_SIZE[1]))


def write_label_value_outside_vocabulary(image: Path, label: Path) -> None:
    save_rgb(image)
    save_label(label, value=7)


def write_colour_label(image: Path, label: Path) -> None:
    save_rgb(image)
    save_rgb(label)


def write_declared_huge_image(image: Path, label: Path) -> None:
    write_png_with_declared_size(image, 30000, 30000)
    save_label(label)


def write_small_image(image: Path, label: Path) -> None:
    save_rgb(image)
    save_label(label)


# (case id, writer, config overrides, the error type behind the failure, message fragments)
BAD_SAMPLES = [
    ("missing image", write_missing_image, {}, FileNotFoundError, ["image.png", "not found"]),
    ("missing label", write_missing_label, {}, FileNotFoundError, ["label.png", "not found"]),
    ("not an image", write_text_as_image, {}, ValueError, ["image.png", "not an image file"]),
    ("truncated image", write_truncated_image, {}, ValueError,
     ["image.png", "truncated or corrupt"]),
    ("label size differs", write_label_of_other_size, {}, ValueError,
     ["image.png", "label.png", "8 x 6", "8 x 5"]),
    ("label value outside ann_list", write_label_value_outside_vocabulary, {}, ValueError,
     ["label.png", "label values [7]", "ann_list"]),
    ("colour label", write_colour_label, {}, ValueError,
     ["label.png", "tools/convert_rgb_labels.py"]),
    ("decompression bomb", write_declared_huge_image, {}, ValueError,
     ["image.png", "30000 x 30000", "INPUT.MAX_IMAGE_PIXELS"]),
    ("over configured pixel limit", write_small_image, {"INPUT.MAX_IMAGE_PIXELS": 47}, ValueError,
     ["image.png", "48 pixels", "47", "INPUT.MAX_IMAGE_PIXELS"]),
]


@pytest.mark.parametrize(
    "write,overrides,cause_type,fragments",
    [case[1:] for case in BAD_SAMPLES],
    ids=[case[0] for case in BAD_SAMPLES],
)
def test_bad_sample_error_names_file(
    tmp_path, dataset_name, write, overrides, cause_type, fragments
):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    write(folder / "img_dir" / "image.png", folder / "ann_dir" / "label.png")
    register_skysa_folder(dataset_name, folder)
    loader = train_net.Trainer.build_train_loader(training_cfg(dataset_name, **overrides))

    with pytest.raises(TooManyBadSamplesError) as info:
        next(iter(loader))

    message = str(info.value)
    assert isinstance(info.value.__cause__, cause_type)
    for fragment in fragments:
        assert fragment in message
    assert "DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION" in message


def test_good_sample_passes_same_path(tmp_path, dataset_name):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    write_small_image(folder / "img_dir" / "image.png", folder / "ann_dir" / "label.png")
    register_skysa_folder(dataset_name, folder)
    loader = train_net.Trainer.build_train_loader(training_cfg(dataset_name))

    batch = next(iter(loader))

    assert batch[0]["image"].shape == (3, *IMAGE_SIZE)
    assert batch[0]["file_name"].endswith("image.png")


# ---- Image conversions -------------------------------------------------------------------------


def grayscale_case(path: Path) -> np.ndarray:
    data = np.arange(48, dtype=np.uint8).reshape(IMAGE_SIZE) * 5
    Image.fromarray(data, mode="L").save(path)
    return np.repeat(data[:, :, None], 3, axis=2)


def palette_case(path: Path) -> np.ndarray:
    indices = np.zeros(IMAGE_SIZE, dtype=np.uint8)
    indices[:, 4:] = 1
    indices[3:, :] = 2
    palette = [[10, 20, 30], [200, 0, 0], [0, 255, 0]]
    pil_image = Image.fromarray(indices, mode="P")
    pil_image.putpalette([value for colour in palette for value in colour] + [0] * (253 * 3))
    pil_image.save(path)
    return np.array(palette, dtype=np.uint8)[indices]


def sixteen_bit_case(path: Path) -> np.ndarray:
    data = (np.arange(48, dtype=np.uint16).reshape(IMAGE_SIZE) * 1000).astype(np.uint16)
    Image.fromarray(data).save(path)
    # The documented stretch: the 2nd..98th percentile range mapped linearly onto 0..255.
    values = data.astype(np.float32)
    low, high = (np.float32(v) for v in np.percentile(values, [2, 98]))
    grey = np.clip((values - low) / (high - low), 0, 1) * np.float32(255)
    return np.repeat(np.rint(grey).astype(np.uint8)[:, :, None], 3, axis=2)


def four_band_case(path: Path) -> np.ndarray:
    bands = np.stack([np.full(IMAGE_SIZE, value, np.uint8) for value in (10, 20, 30, 40)])
    bands[3, 0, 0] = 99
    write_tiff(path, bands)
    # INPUT.BANDS [3, 2, 1] puts the fourth band (near infrared) into the red channel.
    expected = np.stack([bands[3], bands[2], bands[1]], axis=-1)
    return expected


# (case id, file name, writer returning the expected H x W x 3 image, config overrides)
CONVERSIONS = [
    ("grayscale", "gray.png", grayscale_case, {}),
    ("palette", "palette.png", palette_case, {}),
    ("16-bit", "deep.png", sixteen_bit_case, {}),
    ("4-band", "rgbn.tif", four_band_case, {"INPUT.BANDS": [3, 2, 1]}),
]


@pytest.mark.parametrize(
    "file_name,write,overrides",
    [case[1:] for case in CONVERSIONS],
    ids=[case[0] for case in CONVERSIONS],
)
def test_training_mapper_converts_image(tmp_path, dataset_name, file_name, write, overrides):
    folder = make_skysa_folder(tmp_path, file_name, "label.png")
    expected = write(folder / "img_dir" / file_name)
    save_label(folder / "ann_dir" / "label.png")
    register_skysa_folder(dataset_name, folder)
    cfg = training_cfg(dataset_name, **overrides)
    mapper = MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)

    image = mapper.map(DatasetCatalog.get(dataset_name)[0])["image"]

    assert image.dtype == torch.uint8
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_bands_missing_from_image_named(tmp_path, dataset_name):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    write_small_image(folder / "img_dir" / "image.png", folder / "ann_dir" / "label.png")
    register_skysa_folder(dataset_name, folder)
    cfg = training_cfg(dataset_name, **{"INPUT.BANDS": [3, 2, 1]})
    mapper = MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)

    with pytest.raises(ValueError, match="INPUT.BANDS") as info:
        mapper.map(DatasetCatalog.get(dataset_name)[0])
    assert "image.png" in str(info.value)
    assert "[3, 2, 1]" in str(info.value)


# ---- Datasets and graphs -----------------------------------------------------------------------


def test_empty_ann_list_skipped_and_counted(tmp_path, dataset_name, caplog):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    write_small_image(folder / "img_dir" / "image.png", folder / "ann_dir" / "label.png")
    jsonl = folder / "skysa_dataset.jsonl"
    empty = {"flickr_url": "img_dir/x.png", "segmentation": "ann_dir/x.png", "ann_list": []}
    jsonl.write_text(jsonl.read_text() + (json.dumps(empty) + "\n") * 2)
    register_skysa_folder(dataset_name, folder)

    with caplog.at_level(logging.WARNING):
        loader = train_net.Trainer.build_train_loader(training_cfg(dataset_name))
    # One iterator only: Detectron2's aspect-ratio grouping keeps its buckets in the loader, so
    # a second iterator would inherit the first one's pending sample.
    files = {batch[0]["file_name"] for batch in itertools.islice(loader, 3)}

    assert "skipped 2 images with an empty ann_list" in caplog.text
    assert str(jsonl) in caplog.text
    assert {Path(name).name for name in files} == {"image.png"}


def test_all_ann_lists_empty_rejected(tmp_path, dataset_name):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png", classes=())
    register_skysa_folder(dataset_name, folder)

    with pytest.raises(ValueError, match="no usable image") as info:
        train_net.Trainer.build_train_loader(training_cfg(dataset_name))
    assert "skysa_dataset.jsonl" in str(info.value)
    assert "1 with an empty ann_list" in str(info.value)


GRAPHS = [
    ("empty", "", ["graph.jsonl", "no valid relationship record"]),
    ("no relationship", '("entity"{tuple_delimiter}"road")\n',
     ["graph.jsonl", "no valid relationship record"]),
    ("malformed scores", '("relationship"{tuple_delimiter}"road"{tuple_delimiter}"water"'
     '{tuple_delimiter}"high")\n', ["graph.jsonl", "1 malformed"]),
    ("score out of range", '("relationship"{tuple_delimiter}"road"{tuple_delimiter}"water"'
     '{tuple_delimiter}"12")\n', ["graph.jsonl", "line 1", "score 12", "1..10"]),
]


@pytest.mark.parametrize(
    "content,fragments", [case[1:] for case in GRAPHS], ids=[case[0] for case in GRAPHS]
)
def test_bad_graph_file_named(tmp_path, dataset_name, content, fragments):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    register_skysa_folder(dataset_name, folder)
    graph = tmp_path / "graph.jsonl"
    graph.write_text(content)
    cfg = training_cfg(dataset_name, **{"DATASETS.SKYSA.GRAPH_FILE": str(graph)})

    with pytest.raises(ValueError) as info:
        train_net.Trainer.build_train_loader(cfg)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_graph_file_named(tmp_path, dataset_name):
    folder = make_skysa_folder(tmp_path, "image.png", "label.png")
    register_skysa_folder(dataset_name, folder)
    cfg = training_cfg(dataset_name, **{"DATASETS.SKYSA.GRAPH_FILE": str(tmp_path / "no.jsonl")})

    with pytest.raises(FileNotFoundError, match="no.jsonl"):
        train_net.Trainer.build_train_loader(cfg)


def test_unregistered_dataset_lists_registered():
    cfg = training_cfg("skysa_trian")

    with pytest.raises(KeyError) as info:
        train_net.Trainer.build_train_loader(cfg)
    message = str(info.value)
    assert "skysa_trian" in message
    assert "not registered" in message
    assert "skysa_train" in message
    assert "skysense_quickstart_train" in message


def test_empty_training_datasets_rejected():
    cfg = training_cfg("unused")
    cfg.DATASETS.TRAIN = ()

    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        train_net.Trainer.build_train_loader(cfg)


# ---- Config ------------------------------------------------------------------------------------


def test_unknown_config_key_on_command_line():
    args = default_argument_parser().parse_args([
        "--config-file", str(REPO_ROOT / "configs" / "quickstart.yaml"),
        "MODEL.SKYSENSE_O.DECODER.HIDEN_DIM", "32",
    ])

    with pytest.raises(SystemExit) as info:
        train_net.setup(args)
    message = str(info.value)
    assert message.startswith("Invalid command-line override: ")
    assert "Unknown config key MODEL.SKYSENSE_O.DECODER.HIDEN_DIM" in message
    assert "Did you mean HIDDEN_DIM?" in message


def test_odd_number_of_overrides_rejected():
    args = default_argument_parser().parse_args([
        "--config-file", str(REPO_ROOT / "configs" / "quickstart.yaml"), "SOLVER.MAX_ITER",
    ])

    with pytest.raises(SystemExit, match="KEY VALUE pairs"):
        train_net.setup(args)


def test_unknown_config_key_in_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(
        f"_BASE_: {REPO_ROOT / 'configs' / 'quickstart.yaml'}\n"
        "DATASETS:\n  SKYSA:\n    MAX_BAD_SAMPLES: 0.1\n"
    )
    args = default_argument_parser().parse_args(["--config-file", str(config)])

    with pytest.raises(SystemExit) as info:
        train_net.setup(args)
    message = str(info.value)
    assert message.startswith(f"Invalid config file {config}: ")
    assert "DATASETS.SKYSA.MAX_BAD_SAMPLES" in message


# ---- Checkpoints -------------------------------------------------------------------------------


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def mismatching_checkpoint(path: Path) -> None:
    """Save the small model's weights with one key missing, 12 extra and one of another shape."""
    state = small_model().state_dict()
    del state["1.bias"]
    state["1.weight"] = torch.zeros(5, 3)
    state["0.weight"] = torch.full((3, 4), 0.5)
    for index in range(12):
        state[f"extra.{index:02d}"] = torch.zeros(1)
    torch.save({"model": state}, path)


def checkpointer_from_config(model, tmp_path, strict: bool) -> SkySenseOCheckpointer:
    """The checkpointer as train_net.main builds it for --eval-only."""
    cfg = training_cfg("unused", **{"MODEL.SKYSENSE_O.WEIGHTS_STRICT": strict})
    return SkySenseOCheckpointer(
        model, save_dir=str(tmp_path), strict=cfg.MODEL.SKYSENSE_O.WEIGHTS_STRICT
    )


def test_mismatched_checkpoint_refused_with_report(tmp_path):
    path = tmp_path / "other_model.pth"
    mismatching_checkpoint(path)
    model = small_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    with pytest.raises(CheckpointMismatchError) as info:
        checkpointer_from_config(model, tmp_path, strict=True).resume_or_load(
            str(path), resume=False
        )

    message = str(info.value)
    assert "1 missing key(s): 1.bias" in message
    assert "12 unexpected key(s): extra.00" in message
    assert "(2 more)" in message
    assert "1 shape mismatch(es): 1.weight: file (5, 3) vs model (2, 3)" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_mismatched_checkpoint_loads_non_strictly(tmp_path, caplog):
    path = tmp_path / "other_model.pth"
    mismatching_checkpoint(path)
    model = small_model()
    kept_weight = model[1].weight.clone()

    with caplog.at_level(logging.WARNING):
        checkpointer_from_config(model, tmp_path, strict=False).resume_or_load(
            str(path), resume=False
        )

    assert torch.equal(model[0].weight, torch.full((3, 4), 0.5))
    assert torch.equal(model[1].weight, kept_weight)
    assert "1 missing key(s)" in caplog.text
    assert "12 unexpected key(s)" in caplog.text
    assert "1 shape mismatch(es)" in caplog.text


def _write_marker(path: str) -> None:
    Path(path).write_text("code stored in the checkpoint ran")


class RunsCodeWhenUnpickled:
    """An object whose unpickling calls ``_write_marker``: a stand-in for a malicious payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def save_with_payload(path: Path, state: dict, marker: Path) -> None:
    torch.save({**state, "payload": RunsCodeWhenUnpickled(marker)}, path)


def test_payload_runs_when_unpickled(tmp_path):
    # The control for the two tests below: plain unpickling runs the payload, so the marker's
    # absence there shows that the safe loaders never ran it.
    marker = tmp_path / "marker.txt"

    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled(marker)))

    assert marker.exists()


def test_checkpointer_refuses_pickled_code(tmp_path):
    path, marker = tmp_path / "payload.pth", tmp_path / "marker.txt"
    save_with_payload(path, {"model": small_model().state_dict()}, marker)

    with pytest.raises(ValueError) as info:
        checkpointer_from_config(small_model(), tmp_path, strict=True).resume_or_load(
            str(path), resume=False
        )

    assert "payload.pth" in str(info.value)
    assert "arbitrary code" in str(info.value)
    assert not marker.exists()


def test_backbone_checkpoint_refuses_pickled_code(tmp_path):
    path, marker = tmp_path / "clip_payload.pth", tmp_path / "marker.txt"
    save_with_payload(path, {"state_dict": {"logit_scale": torch.ones(())}}, marker)
    cfg = training_cfg("unused", **{
        "MODEL.SKYSENSE_O.BACKBONE.NAME": "OpenCLIPBackbone",
        "MODEL.SKYSENSE_O.BACKBONE.ARCH": "SkySense-Tiny",
        "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE": 64,
        "MODEL.SKYSENSE_O.BACKBONE.CHECKPOINT": str(path),
    })

    with pytest.raises(ValueError) as info:
        build_vl_backbone(cfg)

    assert "clip_payload.pth" in str(info.value)
    assert "arbitrary code" in str(info.value)
    assert not marker.exists()


def test_detectron2_pickle_checkpoint_refused(tmp_path):
    path = tmp_path / "model_zoo.pkl"
    path.write_bytes(b"not loaded")

    with pytest.raises(ValueError, match="model_zoo.pkl"):
        checkpointer_from_config(small_model(), tmp_path, strict=True).load(str(path))
