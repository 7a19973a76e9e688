"""The trainer's report of crops for which the auxiliary region losses were zero."""

import logging
from types import SimpleNamespace

import torch
from detectron2.utils.events import EventStorage

from skysense_o.engine.auxiliary_coverage import SCALAR_NAME, AuxiliaryLossCoverage
from skysense_o.modeling.losses import SkySenseOCriterion


def make_model(region_weight):
    model = torch.nn.Module()
    model.criterion = SkySenseOCriterion(
        pixel_weight=1.0, region_contrast_weight=region_weight, regular_weight=region_weight,
        contrast_scale=1.0, ignore_value=255,
    )
    return model


def train_step(criterion, targets):
    """Run the criterion on one batch of 4 x 4 crops with two names each."""
    count = len(targets)
    criterion([torch.zeros(2, 4, 4)] * count, targets, [torch.eye(2, 3)] * count,
              [torch.eye(2, 3)] * count, [torch.eye(2)] * count, [None] * count)


ONE_CLASS = torch.zeros(4, 4, dtype=torch.long)
TWO_CLASSES = torch.tensor([[0, 0, 1, 1]] * 4)


def run(hook, batches):
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(storage=storage)
        for iteration, targets in enumerate(batches):
            storage.iter = iteration
            train_step(hook.criterion, targets)
            hook.after_step()
        hook.after_train()
        history = storage.histories().get(SCALAR_NAME)
        return history.values() if history is not None else []


def test_running_fraction_and_warning(caplog):
    model = make_model(0.4)
    hook = AuxiliaryLossCoverage(model)

    with caplog.at_level(logging.INFO, logger="skysense_o.engine.auxiliary_coverage"):
        values = run(hook, [[ONE_CLASS, TWO_CLASSES], [ONE_CLASS, ONE_CLASS],
                            [TWO_CLASSES, TWO_CLASSES, ONE_CLASS, ONE_CLASS]])

    # Running fractions: 1 of 2 crops, 3 of 4, then 5 of 8.
    assert values == [(0.5, 0), (0.75, 1), (0.625, 2)]
    record = caplog.records[-1]
    # 5 of 8 crops skipped is more than half, so the summary is a warning.
    assert record.levelno == logging.WARNING
    assert "5 of 8 training crops (62.5%)" in record.getMessage()


def test_summary_info_below_half(caplog):
    model = make_model(0.4)
    train_step(model.criterion, [ONE_CLASS])
    # Counts from before the hook was created (an earlier run) are not reported again.
    hook = AuxiliaryLossCoverage(model)

    with caplog.at_level(logging.INFO, logger="skysense_o.engine.auxiliary_coverage"):
        run(hook, [[TWO_CLASSES, ONE_CLASS, TWO_CLASSES]])

    assert caplog.records[-1].levelno == logging.INFO
    assert "1 of 3 training crops (33.3%)" in caplog.records[-1].getMessage()


def test_silent_when_losses_off(caplog):
    hook = AuxiliaryLossCoverage(make_model(0.0))

    with caplog.at_level(logging.INFO, logger="skysense_o.engine.auxiliary_coverage"):
        values = run(hook, [[ONE_CLASS, TWO_CLASSES]])

    assert values == []
    assert caplog.records == []


def test_applies_to_counting_criterion():
    assert AuxiliaryLossCoverage.applies_to(make_model(0.0))
    assert not AuxiliaryLossCoverage.applies_to(torch.nn.Linear(2, 2))
