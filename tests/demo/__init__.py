"""Tests of the demo and its Predictor, with helpers that build a tiny random-weight checkpoint."""

from pathlib import Path
from typing import Sequence

import torch

# The quick-start model, made faster for tests: a 64-pixel backbone input, 64-pixel windows
# and an 8-class decoder budget, so that one window takes a fraction of a second on a CPU.
TINY_OPTS = (
    "MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE", "64",
    "MODEL.SKYSENSE_O.INFERENCE.WINDOW", "64",
    "MODEL.SKYSENSE_O.INFERENCE.STRIDE", "48",
    "MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET", "8",
)


def save_random_checkpoint(path: Path, opts: Sequence[str] = TINY_OPTS) -> Path:
    """Build the quick-start model with ``opts`` from random weights and save it at ``path``."""
    from detectron2.modeling import build_model
    from predictor import load_config

    cfg = load_config(opts=list(opts))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, path)
    return path
