#!/usr/bin/env python3
"""Measure SkySense-O inference: time and peak memory per image, by decoder and vocabulary.

Two benchmarks, with every configuration in a fresh Python process, so that each peak
resident set size (``ru_maxrss``) belongs to that configuration alone:

* ``whole``: one square uint8 image through ``SkySenseO.forward`` in "whole" mode (the
  public API), for each decoder, vocabulary size T and output kind (``--outputs``, the
  config's ``INFERENCE.OUTPUT``): T x H x W probabilities, or the H x W top class.
  It times the first call (text cache cold), warm calls (text embeddings cached) and cold
  calls (cache cleared before each call), and reports medians. The time is also split into
  text encoding, image tower, decoder and the rest (normalisation, sigmoid and the resizing
  of the probabilities to the output size).
* ``sliding``: a large uint8 image through ``sliding_window_scores``, keeping only the
  argmax label of each finished row, next to a single window measured the same way. Each
  crop is normalised inside the window predictor, so the float image is never built.

Class names are the real names of ``datasets/class_lists`` (classes and synonyms), padded
with generated remote-sensing names. Weights are random unless ``--weights`` names a
checkpoint. They do not change the cost of the probability output, but the label output
interpolates only the classes that compete in each cell, and that depends on the scores.

Usage:

    python bench/bench_inference.py [--benchmark whole|sliding|all] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODERS = ("CostAggregationDecoder", "SAMMaskDecoder")
OUTPUT_KINDS = ("probabilities", "labels")
BENCHMARKS = ("whole", "sliding", "all")
# Wall-clock parts of one call. "cpu" is the CPU time of the whole process over the call (all
# threads), which other processes on a shared machine disturb less than the wall clock.
PARTS = ("total", "text", "image", "decoder", "other", "cpu")
TIMED_PARTS = ("text", "image", "decoder")
# With this variable at 1, PyTorch's CPU allocator requests transparent huge pages from Linux
# for its large allocations. Writing a fresh T x H x W output then costs far fewer page faults.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Word lists for generated class names. 40 modifiers x 45 nouns give 1,800 distinct names,
# enough to pad the real names to the 1,763 of the open-world vocabulary.
NAME_MODIFIERS = (
    "abandoned", "agricultural", "arid", "asphalt", "coastal", "commercial", "concrete",
    "dense", "derelict", "dry", "eroded", "fenced", "flooded", "gravel", "green", "harvested",
    "industrial", "irrigated", "large", "marshy", "military", "mixed", "new", "old", "paved",
    "private", "public", "red-roofed", "residential", "rocky", "rural", "sandy", "small",
    "snow-covered", "sparse", "terraced", "tiled", "unpaved", "urban", "wet",
)
NAME_NOUNS = (
    "airfield", "apron", "barn", "beach", "bridge", "canal", "car park", "cemetery",
    "container yard", "cropland", "dam", "dock", "dune", "factory", "farmhouse", "field",
    "forest", "garden", "glacier", "golf course", "greenhouse", "harbour", "highway", "hillside",
    "lake", "levee", "meadow", "mine", "orchard", "pier", "pond", "quarry", "railway",
    "reservoir", "rooftop", "runway", "scrubland", "silo", "solar farm", "stadium",
    "substation", "tank farm", "vineyard", "warehouse", "wetland",
)

logger = logging.getLogger(__name__)


# ---- Vocabulary --------------------------------------------------------------------------------


def load_real_names(class_lists_dir: Path) -> List[str]:
    """Return the distinct class names and synonyms of the class lists, in file order.

    Reads ``<dir>/*.json`` (key "classes") and ``<dir>/synonyms/*.json`` (key "synonyms", a
    mapping from class name to a list of synonyms).
    """
    if not class_lists_dir.is_dir():
        raise FileNotFoundError(
            f"class-list folder {class_lists_dir} not found; pass --class-lists with the "
            "folder of benchmark class lists (datasets/class_lists in the repository)"
        )
    names: Dict[str, None] = {}
    for path in sorted(class_lists_dir.glob("*.json")):
        names.update(dict.fromkeys(_read_json(path).get("classes", [])))
    for path in sorted((class_lists_dir / "synonyms").glob("*.json")):
        for synonyms in _read_json(path).get("synonyms", {}).values():
            names.update(dict.fromkeys(synonyms))
    return [name for name in names if isinstance(name, str) and name.strip()]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"class list {path} is not valid JSON: {e}") from e


def build_vocabulary(size: int, real_names: Sequence[str]) -> List[str]:
    """Return ``size`` distinct names: the real names first, then generated ones.

    Raises:
        ValueError: when ``size`` is not positive or exceeds the names available.
    """
    if size < 1:
        raise ValueError(f"vocabulary size must be at least 1, got {size}")
    names = list(dict.fromkeys(real_names))
    seen = set(names)
    for noun in NAME_NOUNS:
        for modifier in NAME_MODIFIERS:
            if len(names) >= size:
                return names[:size]
            generated = f"{modifier} {noun}"
            if generated not in seen:
                names.append(generated)
                seen.add(generated)
    if len(names) < size:
        raise ValueError(
            f"vocabulary size {size} exceeds the {len(names)} distinct names available "
            "(real plus generated); choose a smaller size"
        )
    return names[:size]


# ---- Model and measurement helpers -------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Settings from which a worker process builds the benchmarked model."""

    config_file: str
    decoder: str
    device: str = "cpu"
    opts: Tuple[str, ...] = ()
    output: str = "probabilities"
    weights: str = ""
    threads: int = 0
    log_level: int = logging.WARNING


def build_cfg(spec: ModelSpec, inference_mode: str = "whole"):
    """Return the frozen config of ``spec``: its file, overrides, device, decoder and mode."""
    from detectron2.config import get_cfg

    from skysense_o import add_skysense_o_config

    config_file = Path(spec.config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} not found; check --config-file")
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(spec.opts))
    cfg.MODEL.DEVICE = spec.device
    cfg.MODEL.SKYSENSE_O.DECODER.NAME = spec.decoder
    cfg.MODEL.SKYSENSE_O.INFERENCE.MODE = inference_mode
    cfg.MODEL.SKYSENSE_O.INFERENCE.OUTPUT = spec.output
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def build_benchmark_model(spec: ModelSpec, inference_mode: str = "whole"):
    """Build the SkySenseO of ``spec`` in eval mode, with random weights unless
    ``spec.weights`` names a checkpoint (loaded strictly)."""
    from detectron2.modeling import build_model

    from skysense_o.checkpoint import SkySenseOCheckpointer

    torch.manual_seed(0)
    model = build_model(build_cfg(spec, inference_mode)).eval()
    if spec.weights:
        SkySenseOCheckpointer(model).load(spec.weights)
    return model


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process so far, in bytes.

    On Linux, ``ru_maxrss`` also keeps the peak of the process image that ran before
    ``exec``, so a spawned worker would report at least its parent's peak. The high-water
    mark of the worker's own address space (VmHWM in /proc/self/status) does not, so it is
    used where it exists.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kibibytes on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> Optional[int]:
    """Return the resident set size now, in bytes, or None where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class PartTimer:
    """Accumulate the wall time of a SkySenseO's text encoding, image tower and decoder.

    Inside the ``with`` block, ``text_embedder.embed`` and ``encode_images`` are wrapped on
    the instance and the decoder carries forward hooks; leaving the block removes them.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.seconds = dict.fromkeys(TIMED_PARTS, 0.0)
        self._handles = []
        self._decoder_start = 0.0

    def reset(self) -> None:
        self.seconds = dict.fromkeys(TIMED_PARTS, 0.0)

    def _timed(self, part: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return wrapper

    def _decoder_pre_hook(self, module, args) -> None:
        self._decoder_start = time.perf_counter()

    def _decoder_hook(self, module, args, output) -> None:
        self.seconds["decoder"] += time.perf_counter() - self._decoder_start

    def __enter__(self) -> "PartTimer":
        embedder = self.model.text_embedder
        embedder.embed = self._timed("text", embedder.embed)
        self.model.encode_images = self._timed("image", self.model.encode_images)
        decoder = self.model.decoder
        self._handles = [
            decoder.register_forward_pre_hook(self._decoder_pre_hook),
            decoder.register_forward_hook(self._decoder_hook),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        # Deleting the instance attributes uncovers the class methods again.
        del self.model.text_embedder.embed
        del self.model.encode_images
        for handle in self._handles:
            handle.remove()
        self._handles = []


def median_parts(runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Return the per-part median of timed runs (each a dict with the keys of PARTS)."""
    return {part: statistics.median(run[part] for run in runs) for part in PARTS}


def random_image(side: int, seed: int = 0) -> torch.Tensor:
    """Return a 3 x side x side uint8 image of uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)


def benchmark_image(side: int, image_file: str = "") -> torch.Tensor:
    """Return a 3 x side x side uint8 image: ``image_file`` resized, or uniform noise."""
    if not image_file:
        return random_image(side)
    import cv2

    from skysense_o.utils.image_io import read_image

    pixels = cv2.resize(read_image(image_file), (side, side), interpolation=cv2.INTER_AREA)
    return torch.as_tensor(pixels.transpose(2, 0, 1).copy())


def _setup_worker(spec: ModelSpec) -> None:
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s: %(message)s")
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)


# ---- Whole-image benchmark ---------------------------------------------------------------------


def time_forward(model, inputs: List[dict], timer: PartTimer) -> Dict[str, float]:
    """Run one forward of ``inputs`` and return its time split into PARTS, in seconds."""
    timer.reset()
    cpu_start = time.process_time()
    start = time.perf_counter()
    outputs = model(inputs)
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    prediction = outputs[0]["sem_seg"]
    expected = (inputs[0]["height"], inputs[0]["width"])
    if prediction.dim() == 3:
        expected = (len(inputs[0]["texts"]), *expected)
    assert tuple(prediction.shape) == expected, (tuple(prediction.shape), expected)
    del outputs
    other = total - sum(timer.seconds.values())
    return {"total": total, **timer.seconds, "other": other, "cpu": cpu}


def measure_whole(
    spec: ModelSpec,
    vocabulary: Sequence[str],
    *,
    image_size: int,
    repeats: int,
    warmup: int,
    cold_repeats: int,
    image_file: str = "",
) -> dict:
    """Time ``SkySenseO.forward`` on one image in "whole" mode and record the peak memory.

    The image is ``image_file`` resized to ``image_size`` squared, or noise when it is empty.

    Returns:
        A dict with the configuration, ``first`` (the first call, text cache cold), ``warm``
        and ``cold`` (medians per part over ``repeats`` and ``cold_repeats`` calls), and the
        resident set sizes ``rss_model`` (after construction) and ``peak_rss`` in bytes.
    """
    _setup_worker(spec)
    model = build_benchmark_model(spec, "whole")
    rss_model = current_rss_bytes()
    image = benchmark_image(image_size, image_file)
    inputs = [{"image": image, "height": image_size, "width": image_size,
               "texts": list(vocabulary)}]

    # The first call fills the text cache and every lazy initialisation. Warm calls reuse the
    # cached embeddings, and cold calls clear the cache first.
    with torch.no_grad(), PartTimer(model) as timer:
        first = time_forward(model, inputs, timer)
        for _ in range(warmup):
            time_forward(model, inputs, timer)
        warm = [time_forward(model, inputs, timer) for _ in range(repeats)]
        cold = []
        for _ in range(cold_repeats):
            model.text_embedder.clear_cache()
            cold.append(time_forward(model, inputs, timer))
    logger.info("%s T=%d warm runs: %s", spec.decoder, len(vocabulary),
                [round(run["total"], 3) for run in warm])
    return {
        "benchmark": "whole",
        "decoder": spec.decoder,
        "output": spec.output,
        "weights": spec.weights or None,
        "image_file": image_file or None,
        "vocab_size": len(vocabulary),
        "image_size": image_size,
        "threads": torch.get_num_threads(),
        "first": first,
        "warm": median_parts(warm),
        "warm_runs": [run["total"] for run in warm],
        "cold": median_parts(cold) if cold else None,
        "cold_runs": [run["total"] for run in cold],
        "rss_model": rss_model,
        "peak_rss": peak_rss_bytes(),
        "output_bytes": (len(vocabulary) * 4 if spec.output == "probabilities" else 8)
        * image_size * image_size,
    }


# ---- Sliding-window benchmark ------------------------------------------------------------------


def sliding_label_map(
    model,
    image: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    window: int,
    stride: int,
    batch_size: int,
) -> torch.Tensor:
    """Segment a large uint8 image window by window and keep only the label map.

    Args:
        model: a SkySenseO in eval mode.
        image: 3 x H x W uint8 image with H, W >= ``window``.
        text_embeds: T x P x E class embeddings from ``model.text_embedder``.
        window, stride, batch_size: the sliding-window geometry and windows per forward.

    Returns:
        H x W int16 labels, the argmax over the T classes of the averaged window scores.
    """
    from skysense_o.modeling.inference import (
        padded_length,
        score_downsample_factor,
        sliding_window_scores,
    )

    height, width = image.shape[-2:]
    factor = score_downsample_factor(window, stride, model.score_side)
    cell = window // factor
    if (padded_length(height, window, factor), padded_length(width, window, factor)) != (
            height, width):
        # The model pads with zeros after normalising, which a uint8 image cannot hold.
        raise ValueError(
            f"a {height} x {width} image does not tile on the {factor}-pixel score grid of "
            f"window {window} and stride {stride}; choose a size whose excess over the window "
            f"is a multiple of {factor}"
        )
    labels = torch.empty(height, width, dtype=torch.int16)

    def predict(crops: torch.Tensor) -> torch.Tensor:
        # Crops arrive as uint8, so only one batch of windows is ever held in float.
        probs = model.predict_window_scores(model.normalize(crops), text_embeds)
        if probs.shape[-2:] == (cell, cell):
            return probs
        return F.interpolate(probs, size=(cell, cell), mode="bilinear", align_corners=False)

    def keep_argmax(row_start: int, row_end: int, scores: torch.Tensor) -> None:
        labels[row_start:row_end] = scores.argmax(dim=0).to(torch.int16)

    sliding_window_scores(
        image[None], predict, num_classes=text_embeds.shape[0], window=window, stride=stride,
        batch_size=batch_size, emit_rows=keep_argmax, score_downsample=factor,
        blend=model.window_blend,
    )
    return labels


def measure_sliding(
    spec: ModelSpec,
    vocabulary: Sequence[str],
    *,
    image_size: int,
    window: int,
    stride: int,
    repeats: int,
) -> dict:
    """Time ``sliding_label_map`` on one square image and record the peak memory.

    Returns:
        A dict with the configuration, the median time ``seconds`` over ``repeats`` passes,
        and the resident set sizes ``rss_before`` (before the first pass) and ``peak_rss``.
    """
    from skysense_o.modeling.inference import window_positions

    _setup_worker(spec)
    model = build_benchmark_model(spec, "sliding")
    image = random_image(image_size)
    with torch.no_grad():
        text_embeds = model.text_embedder.embed(model.backbone, list(vocabulary))
        rss_before = current_rss_bytes()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            labels = sliding_label_map(model, image, text_embeds, window=window, stride=stride,
                                       batch_size=model.window_batch)
            times.append(time.perf_counter() - start)
    assert labels.shape == image.shape[-2:]
    assert int(labels.min()) >= 0
    assert int(labels.max()) < len(vocabulary)
    windows = len(window_positions(image_size, window, stride)) ** 2
    return {
        "benchmark": "sliding",
        "decoder": spec.decoder,
        "vocab_size": len(vocabulary),
        "image_size": image_size,
        "window": window,
        "stride": stride,
        "window_batch": model.window_batch,
        "windows": windows,
        "threads": torch.get_num_threads(),
        "seconds": statistics.median(times),
        "runs": times,
        "rss_before": rss_before,
        "peak_rss": peak_rss_bytes(),
    }


# ---- Driver ------------------------------------------------------------------------------------


def run_isolated(function: Callable, *args, isolate: bool = True, **kwargs):
    """Call ``function`` in a fresh spawned Python process (or here, with ``isolate=False``)."""
    if not isolate:
        return function(*args, **kwargs)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def machine_info() -> dict:
    """Describe the machine: CPU model, cores, load, Python and torch versions, threads."""
    cpu = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
                cpu[key] = value.strip()
    flags = set(cpu.pop("flags", "").split())
    return {
        "cpu": cpu.get("model name", platform.processor()),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model": cpu.get("model"),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "cpus_visible": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transparent_hugepage": _read_text(THP_SYSFS),
        HUGE_PAGES_VARIABLE: os.environ.get(HUGE_PAGES_VARIABLE),
    }


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass
class BenchResults:
    """Every measurement of one run of the script, with the machine and the command line."""

    command: str
    machine: dict
    whole: List[dict] = field(default_factory=list)
    sliding: List[dict] = field(default_factory=list)
    load_average_end: Optional[Tuple[float, float, float]] = None


# ---- Reporting ---------------------------------------------------------------------------------

MEBIBYTE = 1024 * 1024
# Targets: warm time per image at the largest vocabulary at most this multiple of the time at
# 100 names, and the peak memory of the large sliding-window image at most this multiple of a
# single window's.
VOCAB_TIME_RATIO_LIMIT = 4.0
VOCAB_REFERENCE_SIZE = 100
SLIDING_MEMORY_RATIO_LIMIT = 1.5


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / MEBIBYTE:.0f}"


def format_whole_table(results: Sequence[dict]) -> List[str]:
    """Return the lines of the whole-image table (seconds per image, MiB)."""
    header = ("decoder", "output", "T", "first s", "warm s", "warm CPU s", "cold s", "text", "image",
              "decoder", "other", "model MiB", "peak MiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        warm, cold = result["warm"], result["cold"]
        row = (
            result["decoder"], result.get("output", "probabilities"), f"{result['vocab_size']:,}",
            f"{result['first']['total']:.3f}",
            f"{warm['total']:.3f}", f"{warm['cpu']:.3f}",
            "-" if cold is None else f"{cold['total']:.3f}",
            f"{warm['text']:.3f}", f"{warm['image']:.3f}", f"{warm['decoder']:.3f}",
            f"{warm['other']:.3f}", _mib(result["rss_model"]), _mib(result["peak_rss"]),
        )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_sliding_table(results: Sequence[dict]) -> List[str]:
    """Return the lines of the sliding-window table (seconds per image, MiB)."""
    header = ("decoder", "T", "image", "window/stride", "windows", "s", "s/window",
              "before MiB", "peak MiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row = (
            result["decoder"], f"{result['vocab_size']:,}",
            f"{result['image_size']}x{result['image_size']}",
            f"{result['window']}/{result['stride']}", str(result["windows"]),
            f"{result['seconds']:.2f}", f"{result['seconds'] / result['windows']:.3f}",
            _mib(result["rss_before"]), _mib(result["peak_rss"]),
        )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def check_targets(whole: Sequence[dict], sliding: Sequence[dict]) -> List[dict]:
    """Compare the measurements with the targets.

    Returns:
        One dict per comparison: ``target``, ``decoder``, ``vocab_size``, ``ratio``,
        ``limit`` and ``passed``. The time ratio is taken on the warm wall-clock median, and
        ``part_ratios`` gives it for the process CPU time, the decoder and the rest. The
        sliding-window ratio is taken on the peak RSS and, as ``increment_ratio``, on the
        growth of the RSS during the measured calls.
    """
    checks = []
    by_key = {(r["decoder"], r.get("output", "probabilities"), r["vocab_size"]): r
              for r in whole}
    for (decoder, output, size), result in sorted(by_key.items()):
        reference = by_key.get((decoder, output, VOCAB_REFERENCE_SIZE))
        if reference is None or size <= VOCAB_REFERENCE_SIZE:
            continue
        ratio = result["warm"]["total"] / reference["warm"]["total"]
        part_ratios = {part: result["warm"][part] / max(reference["warm"][part], 1e-9)
                       for part in ("cpu", "decoder", "other")}
        checks.append({"target": f"warm time T={size:,} / T={VOCAB_REFERENCE_SIZE}",
                       "decoder": decoder, "output": output, "vocab_size": size,
                       "ratio": ratio,
                       "part_ratios": part_ratios, "limit": VOCAB_TIME_RATIO_LIMIT,
                       "passed": ratio <= VOCAB_TIME_RATIO_LIMIT})

    singles = {(r["decoder"], r["vocab_size"]): r for r in sliding if r["windows"] == 1}
    for result in sliding:
        single = singles.get((result["decoder"], result["vocab_size"]))
        if result["windows"] == 1 or single is None:
            continue
        ratio = result["peak_rss"] / single["peak_rss"]
        increment_ratio = None
        if result["rss_before"] is not None and single["rss_before"] is not None:
            increment_ratio = ((result["peak_rss"] - result["rss_before"])
                               / max(1, single["peak_rss"] - single["rss_before"]))
        checks.append({"target": f"sliding peak RSS {result['image_size']} / one window",
                       "decoder": result["decoder"], "vocab_size": result["vocab_size"],
                       "ratio": ratio, "increment_ratio": increment_ratio,
                       "limit": SLIDING_MEMORY_RATIO_LIMIT,
                       "passed": ratio <= SLIDING_MEMORY_RATIO_LIMIT})
    return checks


def format_checks(checks: Sequence[dict]) -> List[str]:
    lines = []
    for check in checks:
        extra = ""
        if check.get("part_ratios") is not None:
            extra = " (" + ", ".join(f"{part}: {value:.2f}x"
                                     for part, value in check["part_ratios"].items()) + ")"
        if check.get("increment_ratio") is not None:
            extra = f" (growth over the pre-call RSS: {check['increment_ratio']:.2f}x)"
        verdict = "pass" if check["passed"] else "FAIL"
        output = f" {check['output']}" if check.get("output") else ""
        lines.append(f"{verdict}: {check['decoder']}{output} T={check['vocab_size']:,} "
                     f"{check['target']} = {check['ratio']:.2f}x "
                     f"(limit {check['limit']}x){extra}")
    return lines


# ---- Command line ------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of SkySense-O inference per decoder and vocabulary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config-file", default=str(REPO_ROOT / "configs" / "quickstart.yaml"),
                        help="model config; its decoder is replaced by each of --decoders")

    # What to measure.
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="all",
                        help="which benchmark to run")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS),
                        help="decoders to measure (MODEL.SKYSENSE_O.DECODER.NAME)")
    parser.add_argument("--vocab-sizes", nargs="+", type=int, default=[5, 100, 1763],
                        help="class-name counts T of the whole-image benchmark")
    parser.add_argument("--outputs", nargs="+", choices=OUTPUT_KINDS, default=list(OUTPUT_KINDS),
                        help="whole benchmark: the model outputs to measure "
                             "(MODEL.SKYSENSE_O.INFERENCE.OUTPUT)")
    parser.add_argument("--weights", default="",
                        help="checkpoint to load into every benchmarked model (strict, so its "
                             "decoder must match --decoders); default: random weights")
    parser.add_argument("--image", default="",
                        help="whole benchmark: image file resized to --image-size squared; "
                             "default: uniform noise")
    parser.add_argument("--image-size", type=int, default=640,
                        help="side in pixels of the whole-image benchmark's square image")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed warm calls per configuration (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm calls after the first (cold) call")
    parser.add_argument("--cold-repeats", type=int, default=3,
                        help="timed calls with the text cache cleared before each; 0 skips")

    # The sliding-window benchmark.
    parser.add_argument("--sliding-size", type=int, default=4096,
                        help="side in pixels of the sliding-window benchmark's square image")
    parser.add_argument("--sliding-vocab-sizes", nargs="+", type=int, default=[5, 100],
                        help="class-name counts T of the sliding-window benchmark")
    parser.add_argument(
        "--window", type=int, default=0,
        help="sliding window side in pixels; 0 takes MODEL.SKYSENSE_O.INFERENCE.WINDOW",
    )
    parser.add_argument(
        "--stride", type=int, default=0,
        help="sliding window step in pixels; 0 takes MODEL.SKYSENSE_O.INFERENCE.STRIDE",
    )
    parser.add_argument("--sliding-repeats", type=int, default=1,
                        help="timed sliding-window passes per configuration")

    # Inputs, environment and output.
    parser.add_argument("--class-lists", default=str(REPO_ROOT / "datasets" / "class_lists"),
                        help="folder of class-list JSON files that supplies the real names")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE of the benchmarked model")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker; 0 keeps torch's default")
    parser.add_argument(
        "--huge-pages", choices=("on", "off", "inherit"), default="on",
        help=f"set {HUGE_PAGES_VARIABLE}=1 (on) or unset it (off) in the worker processes, "
             "or keep this shell's value (inherit)",
    )
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, after the options")

    args = parser.parse_args(argv)
    for name in ("repeats", "image_size", "sliding_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    for name in ("weights", "image"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"--{name} {path} is not a file; give an existing path")
    return args


def run_benchmarks(args: argparse.Namespace, *, isolate: bool = True) -> BenchResults:
    """Run the benchmarks that ``args`` selects, each configuration in its own process."""
    real_names = load_real_names(Path(args.class_lists))
    results = BenchResults(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           machine=machine_info())
    log_level = logging.INFO if args.verbose else logging.WARNING
    for decoder in args.decoders:
        spec = ModelSpec(config_file=args.config_file, decoder=decoder, device=args.device,
                         opts=tuple(args.opts), weights=args.weights, threads=args.threads,
                         log_level=log_level)
        if args.benchmark in ("whole", "all"):
            for output in args.outputs:
                for size in args.vocab_sizes:
                    logger.info("whole image: %s, %s, T = %d", decoder, output, size)
                    results.whole.append(run_isolated(
                        measure_whole, replace(spec, output=output),
                        build_vocabulary(size, real_names), isolate=isolate,
                        image_size=args.image_size, repeats=args.repeats, warmup=args.warmup,
                        cold_repeats=args.cold_repeats, image_file=args.image,
                    ))
        if args.benchmark in ("sliding", "all"):
            inference = build_cfg(spec).MODEL.SKYSENSE_O.INFERENCE
            window = args.window or inference.WINDOW
            stride = args.stride or inference.STRIDE
            for size in args.sliding_vocab_sizes:
                vocabulary = build_vocabulary(size, real_names)
                # The reference is an image of exactly one window, measured the same way.
                for side in (window, args.sliding_size):
                    logger.info("sliding window: %s, T = %d, image %d", decoder, size, side)
                    results.sliding.append(run_isolated(
                        measure_sliding, spec, vocabulary, isolate=isolate, image_size=side,
                        window=window, stride=stride, repeats=args.sliding_repeats,
                    ))
    results.load_average_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def _format_load(load: Optional[Sequence[float]]) -> str:
    """Format the 1, 5 and 15-minute load averages with two decimals."""
    return "unknown" if load is None else " / ".join(f"{value:.2f}" for value in load)


def report(results: BenchResults) -> List[str]:
    """Return the printed report: machine, tables and target checks."""
    machine = results.machine
    # The workers set their own thread count (--threads); the parent's is the default.
    worker_threads = sorted({r["threads"] for r in [*results.whole, *results.sliding]
                             if "threads" in r})
    threads = "/".join(map(str, worker_threads)) if worker_threads \
        else str(machine["torch_threads"])
    lines = [
        f"machine: {machine['cpu']} (family {machine['cpu_family']}, model "
        f"{machine['cpu_model']}), {machine['cpus_usable']} usable CPUs, torch "
        f"{machine['torch']}, {threads} threads per worker, load average "
        f"{_format_load(machine['load_average'])} at start and "
        f"{_format_load(results.load_average_end)} at end, "
        f"transparent huge pages {machine.get('transparent_hugepage')}, "
        f"{HUGE_PAGES_VARIABLE}={machine.get(HUGE_PAGES_VARIABLE)}",
    ]
    if results.whole:
        lines += ["", "whole image (seconds per image; parts are warm medians)"]
        lines += format_whole_table(results.whole)
    if results.sliding:
        lines += ["", "sliding window (argmax label map kept per row)"]
        lines += format_sliding_table(results.sliding)
    checks = check_targets(results.whole, results.sliding)
    if checks:
        lines += ["", "targets"] + format_checks(checks)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Spawned workers copy this environment, and PyTorch reads the variable at start-up.
    if args.huge_pages == "on":
        os.environ[HUGE_PAGES_VARIABLE] = "1"
    elif args.huge_pages == "off":
        os.environ.pop(HUGE_PAGES_VARIABLE, None)
    results = run_benchmarks(args)
    print("\n".join(report(results)))
    if args.json:
        payload = asdict(results)
        payload["targets"] = check_targets(results.whole, results.sliding)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
