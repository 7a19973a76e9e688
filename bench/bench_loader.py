#!/usr/bin/env python3
"""Measure the training data loader: images per second of the skysa_semantic mapper.

Iterates Detectron2's ``build_detection_train_loader`` over ``skysense_quickstart_train``
with the training mapper at the release's augmentation settings: short side 384 (long side
at most 1333), a random 384 x 384 crop, SSD colour jitter, horizontal flip and 100 texts per
image. Each run starts a fresh loader, skips ``--warmup`` batches (worker start-up) and times
``--iterations`` batches. The median over ``--runs`` runs is printed.

Needs the quick-start data: run ``python tools/prepare_quickstart.py`` first.

Usage:

    python bench/bench_loader.py [--iterations 50] [--batch-size 4] [--workers 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_train_loader

from skysense_o.config import add_skysense_o_config
from skysense_o.data.dataset_mappers import MAPPER_REGISTRY
from skysense_o.data.datasets.register_folder import QUICKSTART_TRAIN_NAME


def build_cfg(crop_size: int):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.DATASETS.TRAIN = (QUICKSTART_TRAIN_NAME,)
    cfg.INPUT.MIN_SIZE_TRAIN = (crop_size,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (crop_size, crop_size)
    cfg.INPUT.COLOR_AUG_SSD = True
    return cfg


def time_one_run(dataset, mapper, args, seed: int) -> float:
    """Return the images per second of ``args.iterations`` batches after the warm-up."""
    torch.manual_seed(seed)
    loader = build_detection_train_loader(
        dataset, mapper=mapper, total_batch_size=args.batch_size, num_workers=args.workers
    )
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.iterations):
        batch = next(batches)
        assert len(batch) == args.batch_size
    elapsed = time.perf_counter() - start
    del batches, loader
    return args.iterations * args.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="Images per second of the training loader.")
    parser.add_argument("--iterations", type=int, default=50, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per run")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is printed")
    parser.add_argument("--crop", type=int, default=384, help="crop side in pixels")
    args = parser.parse_args()

    cfg = build_cfg(args.crop)
    dataset = DatasetCatalog.get(QUICKSTART_TRAIN_NAME)
    mapper = MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)
    rates = [time_one_run(dataset, mapper, args, seed) for seed in range(args.runs)]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"dataset: {QUICKSTART_TRAIN_NAME} ({len(dataset)} images), batch {args.batch_size}, "
        f"{args.workers} workers, {args.iterations} timed batches after {args.warmup} warm-up"
    )
    print("runs (images/s): " + ", ".join(f"{rate:.1f}" for rate in rates))
    print(f"median: {statistics.median(rates):.1f} images/s")


if __name__ == "__main__":
    main()
