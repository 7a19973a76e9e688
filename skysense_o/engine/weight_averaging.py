"""Average the model's weights over the last part of training.

A small model trained on a handful of images moves a long way between nearby iterations, and
its validation score varies by several points from one checkpoint to the next. The uniform
average of the weights visited late in training (stochastic weight averaging) is a flatter,
steadier solution. ``WeightAveraging`` keeps that average with PyTorch's
``torch.optim.swa_utils.AveragedModel`` and loads it into the model after the last
iteration, before the final checkpoint is written and the model is evaluated.
"""

import logging
import math

import torch
from detectron2.engine import HookBase
from torch.optim.swa_utils import AveragedModel

logger = logging.getLogger(__name__)

# Name of the average in the trainer's checkpoints, so that --resume continues it.
CHECKPOINT_KEY = "weight_average"


def start_iteration(start_fraction: float, max_iter: int) -> int:
    """Return the first iteration (counting from 1) whose weights enter the average.

    Raises:
        ValueError: when ``start_fraction`` is outside [0, 1].
    """
    if not 0.0 <= start_fraction <= 1.0:
        raise ValueError(
            f"invalid SOLVER.WEIGHT_AVERAGE.START_FRACTION {start_fraction}: it must lie "
            "between 0 and 1"
        )
    return min(max_iter, max(1, math.ceil(start_fraction * max_iter)))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside DistributedDataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class WeightAveraging(HookBase):
    """Average the model's weights every ``period`` iterations from ``start_iter`` on.

    The average includes the weights after iteration ``start_iter`` (counting from 1), every
    ``period`` iterations after that, and after the last iteration. Buffers are averaged with
    the parameters. After the last iteration the average replaces the model's weights, so the
    final checkpoint and the final evaluation use it. Register this hook before Detectron2's
    ``PeriodicCheckpointer``, which writes ``model_final`` in the same step.
    """

    def __init__(self, model: torch.nn.Module, *, start_iter: int, period: int, max_iter: int):
        """
        Args:
            model: the trained model (possibly wrapped in DistributedDataParallel).
            start_iter: the first iteration whose weights enter the average, 1..max_iter.
            period: iterations between two snapshots; at least 1.
            max_iter: the iteration count of the run (SOLVER.MAX_ITER).
        """
        if period < 1:
            raise ValueError(
                f"invalid SOLVER.WEIGHT_AVERAGE.PERIOD {period}: it must be at least 1"
            )
        if not 1 <= start_iter <= max_iter:
            raise ValueError(
                f"invalid first averaged iteration {start_iter}: it must lie between 1 and "
                f"SOLVER.MAX_ITER ({max_iter})"
            )
        self.model = _unwrap(model)
        self.start_iter = start_iter
        self.period = period
        self.max_iter = max_iter
        # The copy stays on the model's device. Buffers are averaged too: SkySense-O has no
        # batch normalisation, whose statistics would need recomputing after averaging.
        self.averaged = AveragedModel(self.model, use_buffers=True)

    @property
    def num_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def takes_snapshot(self, completed: int) -> bool:
        """Return whether the weights after ``completed`` iterations enter the average."""
        if completed == self.max_iter:
            return True
        return completed >= self.start_iter and (completed - self.start_iter) % self.period == 0

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if self.takes_snapshot(completed):
            self.averaged.update_parameters(self.model)
        if completed == self.max_iter:
            self.model.load_state_dict(self.averaged.module.state_dict())
            logger.info(
                "Loaded the average of %d weight snapshots (iterations %d to %d) into the model.",
                self.num_averaged, self.start_iter, self.max_iter,
            )
