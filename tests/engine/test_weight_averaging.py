"""Stochastic weight averaging over the end of training."""

import logging
from types import SimpleNamespace

import pytest
import torch

from skysense_o.engine.weight_averaging import WeightAveraging, start_iteration


class Counter(torch.nn.Module):
    """A model whose weight and buffer are set by hand at each step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("running", torch.zeros(1))


def run(hook, model, max_iter):
    hook.trainer = SimpleNamespace(iter=0)
    for iteration in range(max_iter):
        # The weights after iteration i + 1 (counting from 1) are i + 1.
        with torch.no_grad():
            model.weight.fill_(iteration + 1)
            model.running.fill_(10 * (iteration + 1))
        hook.trainer.iter = iteration
        hook.after_step()


def test_average_of_snapshots_replaces_weights(caplog):
    model = Counter()
    hook = WeightAveraging(model, start_iter=4, period=3, max_iter=11)

    with caplog.at_level(logging.INFO, logger="skysense_o.engine.weight_averaging"):
        run(hook, model, 11)

    # Snapshots after iterations 4, 7, 10 and the last one, 11.
    assert hook.num_averaged == 4
    expected = (4 + 7 + 10 + 11) / 4
    assert torch.allclose(model.weight, torch.full((2,), expected))
    assert torch.allclose(model.running, torch.full((1,), 10 * expected))
    assert "average of 4 weight snapshots" in caplog.text


def test_snapshot_schedule():
    hook = WeightAveraging(Counter(), start_iter=5, period=2, max_iter=10)
    snapshots = [i for i in range(1, 11) if hook.takes_snapshot(i)]
    assert snapshots == [5, 7, 9, 10]


def test_weights_untouched_before_last_iteration():
    model = Counter()
    hook = WeightAveraging(model, start_iter=1, period=1, max_iter=5)
    run(hook, model, 4)
    assert torch.equal(model.weight, torch.full((2,), 4.0))
    assert hook.num_averaged == 4


def test_start_iteration_from_fraction():
    assert start_iteration(0.6, 1000) == 600
    assert start_iteration(0.6, 3) == 2
    assert start_iteration(0.0, 10) == 1
    assert start_iteration(1.0, 10) == 10
    with pytest.raises(ValueError, match="START_FRACTION 1.5"):
        start_iteration(1.5, 10)


def test_invalid_schedule_is_rejected():
    with pytest.raises(ValueError, match="PERIOD 0"):
        WeightAveraging(Counter(), start_iter=1, period=0, max_iter=10)
    with pytest.raises(ValueError, match="first averaged iteration 11"):
        WeightAveraging(Counter(), start_iter=11, period=1, max_iter=10)
