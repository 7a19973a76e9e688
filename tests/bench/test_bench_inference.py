"""Smoke tests of bench/bench_inference.py at tiny sizes. They check values, never timings."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import bench_inference as bench

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASS_LISTS = REPO_ROOT / "datasets" / "class_lists"
QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")
# The quick-start model at a 64-pixel input (a 4 x 4 token grid) and 64-pixel windows, so that
# every forward takes milliseconds.
SMALL_INPUT = (
    "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE", "64",
    "MODEL.SKYSENSE_O.INFERENCE.WINDOW", "64",
    "MODEL.SKYSENSE_O.INFERENCE.STRIDE", "48",
)


def tiny_spec(decoder: str) -> bench.ModelSpec:
    # One thread: on a busy machine, tiny operators run faster without a thread team.
    return bench.ModelSpec(config_file=QUICKSTART, decoder=decoder, opts=SMALL_INPUT, threads=1)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Undo the thread count that the measurement functions set for this process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sam_model():
    return bench.build_benchmark_model(tiny_spec("SAMMaskDecoder"), "sliding")


# ---- Vocabulary ---------------------------------------------------------------------------


def test_vocabulary_starts_with_real_names():
    real = bench.load_real_names(CLASS_LISTS)
    assert "building" in real
    assert "ship" in real
    assert len(real) == len(set(real))
    assert bench.build_vocabulary(5, real) == real[:5]


def test_vocabulary_of_1763_distinct_names():
    real = bench.load_real_names(CLASS_LISTS)
    names = bench.build_vocabulary(1763, real)
    assert len(names) == 1763
    assert len(set(names)) == 1763
    assert names[: len(real)] == real


@pytest.mark.parametrize("size, message", [(0, "at least 1, got 0"), (10**6, "exceeds the")])
def test_vocabulary_size_invalid(size, message):
    with pytest.raises(ValueError, match=message):
        bench.build_vocabulary(size, ["road"])


def test_missing_class_lists_folder(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match="absent"):
        bench.load_real_names(missing)


def test_class_list_invalid_json(tmp_path):
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        bench.load_real_names(tmp_path)


# ---- Measurements -------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", bench.DECODERS)
def test_measure_whole_tiny(decoder):
    result = bench.measure_whole(
        tiny_spec(decoder), ["road", "building", "water"], image_size=64, repeats=1, warmup=0,
        cold_repeats=1,
    )
    assert (result["decoder"], result["vocab_size"], result["image_size"]) == (decoder, 3, 64)
    for phase in ("first", "warm", "cold"):
        assert set(result[phase]) == set(bench.PARTS)
        assert result[phase]["total"] > 0
        assert min(result[phase].values()) >= 0
    # The parts run inside the call, so they never add up to more than its time.
    assert result["warm"]["text"] + result["warm"]["decoder"] <= result["warm"]["total"]
    assert len(result["warm_runs"]) == 1
    assert len(result["cold_runs"]) == 1
    assert result["peak_rss"] >= result["rss_model"] > 0
    assert result["output_bytes"] == 3 * 64 * 64 * 4


def test_part_timer_restores_model(sam_model):
    model = sam_model
    with bench.PartTimer(model):
        assert "encode_images" in vars(model)
    assert "encode_images" not in vars(model)
    assert "embed" not in vars(model.text_embedder)
    assert not model.decoder._forward_hooks
    assert not model.decoder._forward_pre_hooks


def test_sliding_label_map_matches_model(sam_model):
    # The benchmark's row-streaming path must label like SkySenseO.sliding_scores.
    model = sam_model
    image = bench.random_image(80)
    with torch.no_grad():
        text_embeds = model.text_embedder.embed(model.backbone, ["road", "roof", "tree", "car"])
        labels = bench.sliding_label_map(
            model, image, text_embeds, window=model.window, stride=model.stride, batch_size=3
        )
        expected = model.sliding_scores(model.normalize(image), text_embeds).argmax(dim=0)
    assert labels.dtype == torch.int16
    assert torch.equal(labels.long(), expected)


def test_measure_sliding_counts_windows():
    result = bench.measure_sliding(
        tiny_spec("CostAggregationDecoder"), ["road", "roof"], image_size=80, window=64,
        stride=48, repeats=1,
    )
    # Window starts 0 and 16 on each axis.
    assert result["windows"] == 4
    assert (result["window"], result["stride"]) == (64, 48)
    assert result["peak_rss"] >= result["rss_before"] > 0


# ---- Targets and report -------------------------------------------------------------------


def whole_result(size: int, seconds: float) -> dict:
    parts = {part: seconds for part in bench.PARTS}
    return {"decoder": "SAMMaskDecoder", "vocab_size": size, "warm": parts}


def test_check_targets_compare_within_one_output_kind():
    labels = [{**whole_result(100, 0.5), "output": "labels"},
              {**whole_result(1763, 1.0), "output": "labels"}]
    probabilities = [{**whole_result(100, 0.1), "output": "probabilities"},
                     {**whole_result(1763, 0.6), "output": "probabilities"}]

    checks = bench.check_targets(probabilities + labels, [])

    assert [(check["output"], check["ratio"]) for check in checks] == [
        ("labels", pytest.approx(2.0)), ("probabilities", pytest.approx(6.0))]
    assert [check["passed"] for check in checks] == [True, False]
    assert bench.format_checks(checks)[0].startswith("pass: SAMMaskDecoder labels T=1,763")


def sliding_result(side: int, windows: int, peak: int, before: int) -> dict:
    return {"decoder": "SAMMaskDecoder", "vocab_size": 5, "image_size": side,
            "windows": windows, "peak_rss": peak, "rss_before": before}


def test_check_targets_ratios():
    whole = [whole_result(5, 1.0), whole_result(100, 2.0), whole_result(1763, 9.0)]
    sliding = [sliding_result(384, 1, 1000, 900), sliding_result(4096, 256, 1400, 900)]
    checks = bench.check_targets(whole, sliding)
    assert len(checks) == 2
    vocab, memory = checks
    assert vocab["vocab_size"] == 1763
    assert vocab["ratio"] == pytest.approx(4.5)
    assert not vocab["passed"]
    assert memory["ratio"] == pytest.approx(1.4)
    assert memory["increment_ratio"] == pytest.approx(5.0)
    assert memory["passed"]
    assert bench.format_checks(checks)[0].startswith("FAIL: SAMMaskDecoder probabilities T=1,763")


def test_parse_args_keeps_config_overrides():
    args = bench.parse_args(
        ["--decoders", "SAMMaskDecoder", "--repeats", "2",
         "MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET", "8"]
    )
    assert args.decoders == ["SAMMaskDecoder"]
    assert args.opts == ["MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET", "8"]


def test_parse_args_missing_weights_or_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights .*missing.pth is not a file"):
        bench.parse_args(["--weights", str(tmp_path / "missing.pth")])
    with pytest.raises(FileNotFoundError, match="--image .*nothing.png is not a file"):
        bench.parse_args(["--image", str(tmp_path / "nothing.png")])


def test_benchmark_image_reads_and_resizes_file(samples_dir):
    image_file = next((samples_dir / "demo").glob("*.png"))

    image = bench.benchmark_image(48, str(image_file))

    assert image.shape == (3, 48, 48)
    assert image.dtype == torch.uint8
    assert float(image.float().std()) > 1.0


def test_weights_are_loaded_strictly(tmp_path):
    spec = tiny_spec("SAMMaskDecoder")
    model = bench.build_benchmark_model(spec)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    checkpoint = tmp_path / "shifted.pth"
    torch.save({"model": model.state_dict()}, checkpoint)

    loaded = bench.build_benchmark_model(replace(spec, weights=str(checkpoint)))

    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_parse_args_invalid_repeats():
    with pytest.raises(ValueError, match="--repeats must be at least 1, got 0"):
        bench.parse_args(["--repeats", "0"])


def test_run_benchmarks_in_process():
    args = bench.parse_args(
        ["--benchmark", "whole", "--decoders", "SAMMaskDecoder", "--vocab-sizes", "2", "3",
         "--image-size", "64", "--repeats", "1", "--warmup", "0", "--cold-repeats", "0",
         "--threads", "1", *SMALL_INPUT]
    )
    results = bench.run_benchmarks(args, isolate=False)
    assert [(r["output"], r["vocab_size"]) for r in results.whole] == [
        ("probabilities", 2), ("probabilities", 3), ("labels", 2), ("labels", 3)]
    assert results.whole[0]["cold"] is None
    assert results.whole[1]["output_bytes"] == 3 * 64 * 64 * 4
    assert results.whole[3]["output_bytes"] == 64 * 64 * 8
    lines = bench.report(results)
    assert lines[0].startswith("machine: ")
    assert ", 1 threads per worker, " in lines[0]
    assert re.search(r"load average \d+\.\d\d / \d+\.\d\d / \d+\.\d\d at start", lines[0])
    table_rows = [line for line in lines if line.startswith("| SAMMaskDecoder")]
    assert len(table_rows) == 4
    assert table_rows[2].startswith("| SAMMaskDecoder | labels | 2 |")


def test_worker_peak_excludes_parent():
    # A spawned worker that only imports the benchmark must report a peak below this
    # process's, which contains an extra 256 MiB. Linux's ru_maxrss would report at least ours.
    ballast = bytearray(256 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    parent_rss = bench.current_rss_bytes()
    parent_peak = bench.peak_rss_bytes()
    worker_peak = bench.run_isolated(bench.peak_rss_bytes)
    assert parent_rss > 256 * 1024 * 1024
    assert parent_peak >= parent_rss
    assert worker_peak < parent_peak
