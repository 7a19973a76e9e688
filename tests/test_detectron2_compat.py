"""The installed Detectron2 works with this environment's NumPy and Pillow."""

import numpy as np
import torch
from PIL import Image


def test_detectron2_main_packages_import():
    import detectron2.data  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401
    import detectron2.projects.deeplab  # noqa: F401
    import detectron2.projects.point_rend  # noqa: F401


def test_resize_transform_uses_bilinear_by_default():
    from detectron2.data.transforms import ExtentTransform, ResizeTransform

    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    resized = ResizeTransform(4, 6, 8, 12).apply_image(image)
    extent = ExtentTransform((0, 0, 6, 4), (2, 3)).apply_image(image)

    assert resized.shape == (8, 12, 3)
    assert extent.shape == (2, 3, 3)
    assert ExtentTransform.__init__.__defaults__[0] == Image.BILINEAR


def test_builtin_sem_seg_evaluator_runs_on_tiny_case(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    label = np.array([[0, 0, 1], [1, 255, 1]], dtype=np.uint8)
    label_path = tmp_path / "label.png"
    Image.fromarray(label).save(label_path)
    name = "compat_tiny_sem_seg"
    record = {"file_name": "x.png", "sem_seg_file_name": str(label_path)}
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False, output_dir=None)
    evaluator.reset()
    scores = torch.zeros(2, 2, 3)
    scores[0, 0, :2] = 1.0  # predicts class a at (0,0), (0,1); class b elsewhere
    scores[1, 0, 2] = 1.0
    scores[1, 1, :] = 1.0

    evaluator.process([{"file_name": "x.png", "sem_seg_file_name": str(label_path)}],
                      [{"sem_seg": scores}])
    results = evaluator.evaluate()["sem_seg"]

    assert results["pACC"] == 100.0
    assert results["mIoU"] == 100.0


def test_bitmasks_use_builtin_bool():
    from detectron2.structures.masks import polygons_to_bitmask

    mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 5, 5)

    assert mask.dtype == bool
    assert mask.sum() > 0


def test_no_detectron2_source_in_repository():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The notice is assembled here so that this file does not match its own search.
    notice = "Copyright (c) " + "Facebook"
    found = subprocess.run(["git", "grep", "-l", notice], cwd=root, capture_output=True, text=True)
    assert found.stdout.strip() == ""
