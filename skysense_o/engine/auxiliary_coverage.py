"""Report how often the auxiliary region losses could not be computed during training.

The region contrast and the regulariser compare the classes present in a crop, so a crop with
fewer than two labelled classes contributes zero to them. When most crops are like that (small
crops of homogeneous scenes, or a dataset with one class per image), the auxiliary weights in
the config have almost no effect, and nothing in the loss curves shows it. After every
iteration, this hook puts the fraction of such crops since the start of training into the
event storage, so each write of ``metrics.json`` and TensorBoard records the running fraction.
When training ends, it logs the totals.
"""

import logging

from detectron2.engine import HookBase

from .weight_averaging import _unwrap

logger = logging.getLogger(__name__)

# Name of the per-iteration scalar in the event storage.
SCALAR_NAME = "auxiliary_skipped_fraction"

# Above this fraction of skipped crops, the end-of-training summary is a warning.
WARN_FRACTION = 0.5


class AuxiliaryLossCoverage(HookBase):
    """Track the criterion's counts of crops seen and skipped by the auxiliary losses.

    The model must have a ``criterion`` with ``auxiliary_crops`` and ``skipped_auxiliary``
    counters (``SkySenseOCriterion``). The hook does nothing when the auxiliary losses are off.
    """

    @staticmethod
    def applies_to(model) -> bool:
        """Return whether ``model`` has a criterion with the counters this hook reads."""
        criterion = getattr(_unwrap(model), "criterion", None)
        return hasattr(criterion, "auxiliary_crops") and hasattr(criterion, "skipped_auxiliary")

    def __init__(self, model):
        """
        Args:
            model: the trained model (possibly wrapped in DistributedDataParallel).
        """
        self.criterion = _unwrap(model).criterion
        self._start_crops = self.criterion.auxiliary_crops
        self._start_skipped = self.criterion.skipped_auxiliary

    def after_step(self) -> None:
        crops = self.criterion.auxiliary_crops - self._start_crops
        if crops == 0:
            return
        skipped = self.criterion.skipped_auxiliary - self._start_skipped
        # The running fraction is written as is: the writers' default median over 20 iterations
        # would show 0 whenever fewer than half of those iterations had a skipped crop.
        self.trainer.storage.put_scalar(SCALAR_NAME, skipped / crops, smoothing_hint=False)

    def after_train(self) -> None:
        crops = self.criterion.auxiliary_crops - self._start_crops
        if crops == 0:
            return
        skipped = self.criterion.skipped_auxiliary - self._start_skipped
        level = logging.WARNING if skipped > WARN_FRACTION * crops else logging.INFO
        logger.log(
            level,
            "The auxiliary region losses were zero for %d of %d training crops (%.1f%%), "
            "because those crops held fewer than two labelled classes.",
            skipped, crops, 100.0 * skipped / crops,
        )
