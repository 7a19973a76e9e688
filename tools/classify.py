#!/usr/bin/env python3
"""Zero-shot scene classification with the vision-language backbone of a SkySense-O model.

Each image is resized (bilinear, aspect ratio not kept) to the backbone's square input,
MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE, normalised with MODEL.PIXEL_MEAN and MODEL.PIXEL_STD,
and embedded with the backbone's pooled image embedding (``encode_pooled``). Every class name
is put into the config's prompt templates and embedded by the model's text embedder. The score
of a class is the cosine similarity of the two embeddings. Any backbone works: SkySense-CLIP
(the release) or an open_clip model.

Classify images (files or folders) with a list of names:

    python tools/classify.py --config configs/skysense_o_release.yaml \
        --weights checkpoints/skysense_o.pth --classes "airport,beach,forest,harbor" \
        --input scenes/ --top-k 3

Measure accuracy on a folder with one subfolder of images per class (RESISC45, AID, ...):

    python tools/classify.py --config configs/skysense_o_release.yaml \
        --weights checkpoints/skysense_o.pth --eval-folder AID/ --top-k 5

In evaluation mode the class names are the subfolder names, with "_" read as a space, unless
--classes gives one name per subfolder in sorted order. Config overrides follow ``--opts``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg

from skysense_o import add_skysense_o_config
from skysense_o.release import build_model_for_inference
from skysense_o.utils.image_io import read_image

logger = logging.getLogger("classify")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


# ---- inputs -------------------------------------------------------------------------------------

def parse_classes(value: str) -> List[str]:
    """Read class names from a comma-separated list, a .txt file (one per line) or a .json
    file (a list of names, or an object with a "classes" list).

    Raises:
        FileNotFoundError: ``value`` names a .txt or .json file that does not exist.
        ValueError: no names, repeated names, or a JSON file of another shape.
    """
    path = Path(value)
    if path.suffix.lower() in (".txt", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"class file {path} not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".txt":
            names = text.splitlines()
        else:
            names = _names_from_json(json.loads(text), path)
    else:
        names = value.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"no class names in {value!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"class names must be distinct; repeated: {repeated}")
    return names


def _names_from_json(data, path: Path) -> List[str]:
    if isinstance(data, dict):
        data = data.get("classes")
    if not isinstance(data, list) or not all(isinstance(name, str) for name in data):
        raise ValueError(
            f"{path} must hold a list of class names or an object with a 'classes' list"
        )
    return data


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def collect_images(inputs: Sequence[str]) -> List[Path]:
    """Return the image files named by ``inputs``: files as given, folders searched
    recursively (sorted).

    Raises:
        FileNotFoundError: an input does not exist, or no image was found.
    """
    images: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images.extend(sorted(p for p in path.rglob("*") if is_image(p)))
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not images:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(inputs)}"
        )
    return images


def read_class_folders(
    root: Path, class_names: Optional[List[str]] = None
) -> Tuple[List[str], List[Path], List[int]]:
    """List a folder of class subfolders.

    Args:
        root: a folder whose subfolders each hold the images of one class.
        class_names: one name per subfolder, in sorted subfolder order. Default: the subfolder
            names with "_" replaced by a space.

    Returns:
        (class names, image paths, label index of each image).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation folder {root} not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class subfolders")
    if class_names is None:
        class_names = [folder.name.replace("_", " ") for folder in folders]
    elif len(class_names) != len(folders):
        raise ValueError(
            f"--classes gives {len(class_names)} names but {root} has {len(folders)} class "
            f"subfolders ({', '.join(f.name for f in folders)}); give one name per subfolder "
            "in sorted order"
        )
    paths, labels = [], []
    for index, folder in enumerate(folders):
        images = sorted(p for p in folder.rglob("*") if is_image(p))
        if not images:
            logger.warning("class folder %s has no images", folder)
        paths.extend(images)
        labels.extend([index] * len(images))
    if not paths:
        raise FileNotFoundError(f"no images found under {root}")
    return class_names, paths, labels


# ---- the classifier ----------------------------------------------------------------------------

class ZeroShotClassifier:
    """Cosine similarity of pooled image embeddings and prompt-template text embeddings."""

    def __init__(self, model: torch.nn.Module, *, image_size: int, batch_size: int = 8,
                 bands: Sequence[int] = (0, 1, 2), max_pixels: Optional[int] = None):
        """
        Args:
            model: a SkySense-O model (``backbone``, ``text_embedder`` and ``normalize``).
            image_size: side of the square each image is resized to.
            batch_size: images per backbone forward.
            bands, max_pixels: passed to ``read_image`` (INPUT.BANDS, INPUT.MAX_IMAGE_PIXELS).
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.image_size = image_size
        self.batch_size = batch_size
        self.bands = tuple(bands)
        self.max_pixels = max_pixels

    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """Return T x E normalised class embeddings (templates averaged)."""
        embeds = self.model.text_embedder.embed(self.model.backbone, list(class_names))
        return F.normalize(embeds.float().mean(dim=1), dim=-1)

    def load_image(self, path: Path) -> torch.Tensor:
        """Return the normalised 3 x S x S input for one image file."""
        array = read_image(path, bands=self.bands, max_pixels=self.max_pixels)
        image = self.model.normalize(torch.from_numpy(array).permute(2, 0, 1))
        return F.interpolate(image[None], size=(self.image_size, self.image_size),
                             mode="bilinear", align_corners=False)[0]

    @torch.no_grad()
    def image_embeddings(self, paths: Sequence[Path]) -> torch.Tensor:
        """Return N x E normalised pooled embeddings of the image files."""
        embeds = []
        for start in range(0, len(paths), self.batch_size):
            batch = torch.stack([self.load_image(p) for p in paths[start:start + self.batch_size]])
            embeds.append(self.model.backbone.encode_pooled(batch).float())
            logger.info("embedded %d/%d images", min(start + self.batch_size, len(paths)),
                        len(paths))
        return F.normalize(torch.cat(embeds), dim=-1)

    def scores(self, paths: Sequence[Path], class_names: Sequence[str]) -> torch.Tensor:
        """Return the N x T cosine similarities of images and classes, on the CPU."""
        text = self.text_embeddings(class_names)
        return (self.image_embeddings(paths) @ text.T).cpu()


# ---- results ------------------------------------------------------------------------------------

@dataclass
class Accuracy:
    """Top-1 and top-k accuracy (0..1) over ``count`` images, and top-1 per class."""

    top1: float
    topk: float
    k: int
    count: int
    per_class: Dict[str, float]


DEFAULT_TOP_K = 5


def check_top_k(k: int, num_classes: int) -> None:
    """Raise ValueError unless 1 <= k <= num_classes."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"--top-k must be between 1 and the {num_classes} classes, got {k}")


def top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the N x k best scores and class indices, best first."""
    check_top_k(k, scores.shape[1])
    return scores.topk(k, dim=1)


def accuracy(scores: torch.Tensor, labels: Sequence[int], class_names: Sequence[str],
             k: int) -> Accuracy:
    """Compute top-1, top-k and per-class top-1 accuracy of N x T ``scores``."""
    labels_tensor = torch.as_tensor(list(labels))
    _, predicted = top_k(scores, k)
    hits = predicted == labels_tensor[:, None]
    correct_top1 = hits[:, 0].float()
    per_class = {}
    for index, name in enumerate(class_names):
        members = labels_tensor == index
        if members.any():
            per_class[name] = float(correct_top1[members].mean())
    return Accuracy(top1=float(correct_top1.mean()), topk=float(hits.any(dim=1).float().mean()),
                    k=k, count=len(labels_tensor), per_class=per_class)


def format_predictions(paths: Sequence[Path], class_names: Sequence[str],
                       scores: torch.Tensor, k: int) -> str:
    """Return one block per image: its path, then its k best classes with their scores."""
    values, indices = top_k(scores, k)
    lines = []
    for path, row_values, row_indices in zip(paths, values.tolist(), indices.tolist()):
        lines.append(str(path))
        for rank, (value, index) in enumerate(zip(row_values, row_indices), start=1):
            lines.append(f"  {rank}. {class_names[index]}  {value:.4f}")
    return "\n".join(lines)


def format_accuracy(result: Accuracy) -> str:
    """Return the per-class table and the overall accuracies."""
    width = max(len(name) for name in result.per_class)
    lines = [f"{'class':<{width}}  top-1"]
    lines += [f"{name:<{width}}  {100 * value:6.2f}" for name, value in result.per_class.items()]
    lines.append(f"top-1 accuracy: {100 * result.top1:.2f}% ({result.count} images)")
    lines.append(f"top-{result.k} accuracy: {100 * result.topk:.2f}%")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------

def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="SkySense-O config file")
    parser.add_argument("--weights", default="",
                        help="full-model weights (MODEL.WEIGHTS); empty: the config's")
    parser.add_argument("--classes", help="comma-separated names, or a .txt/.json file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", nargs="+", help="image files or folders to classify")
    mode.add_argument("--eval-folder", type=Path,
                      help="folder of class subfolders; prints top-1 and top-k accuracy")
    parser.add_argument("--top-k", type=int, default=None,
                        help="classes listed per image, and k of the top-k accuracy "
                             f"(default: {DEFAULT_TOP_K}, or the number of classes if fewer)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", help="torch device; default: cuda when available, else cpu")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser


def setup_cfg(config: str, opts: Sequence[str]) -> CfgNode:
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file {config} not found")
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def run(args: argparse.Namespace) -> str:
    """Classify or evaluate as ``args`` requests and return the text to print."""
    cfg = setup_cfg(args.config, args.opts)
    class_names = parse_classes(args.classes) if args.classes else None
    if args.eval_folder is not None:
        class_names, paths, labels = read_class_folders(args.eval_folder, class_names)
    elif class_names is None:
        raise ValueError("--classes is required with --input")
    else:
        paths = collect_images(args.input)
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, len(class_names))
    check_top_k(args.top_k, len(class_names))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = args.weights or cfg.MODEL.WEIGHTS
    model = build_model_for_inference(cfg, weights, device,
                                      low_memory=cfg.MODEL.SKYSENSE_O.LOW_MEMORY_LOAD)
    classifier = ZeroShotClassifier(
        model, image_size=cfg.MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE, batch_size=args.batch_size,
        bands=cfg.INPUT.BANDS, max_pixels=cfg.INPUT.MAX_IMAGE_PIXELS,
    )
    scores = classifier.scores(paths, class_names)
    if args.eval_folder is not None:
        return format_accuracy(accuracy(scores, labels, class_names, args.top_k))
    return format_predictions(paths, class_names, scores, args.top_k)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(run(args))
    except (OSError, ValueError, KeyError) as error:
        print(f"classify.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
