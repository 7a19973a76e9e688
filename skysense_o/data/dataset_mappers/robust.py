"""A mapper wrapper that skips training samples that fail to load, up to a configured share."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, Optional, Sequence

from detectron2.config import configurable

logger = logging.getLogger(__name__)

# The errors that mean "this sample's files are bad" rather than "the code is wrong". The image
# and label readers raise FileNotFoundError (an OSError) for a missing file and ValueError for an
# unreadable, truncated, oversized or inconsistent one. Any other error, such as a KeyError from
# a malformed dataset dict, is a bug or a registration problem and stops the run at once.
BAD_SAMPLE_ERRORS = (OSError, ValueError)

# The share of bad samples is checked only after this many samples were read (or the whole
# dataset, when it is smaller), so that one early failure does not stop a run.
MIN_SAMPLES_BEFORE_CHECK = 20

# Seed of the generator that draws replacement samples, fixed so that runs repeat exactly.
REPLACEMENT_SEED = 42
# Random draws of a replacement before the dataset is searched in order, which happens only
# when nearly every sample has failed.
MAX_RANDOM_DRAWS = 100

FRACTION_KEY = "DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION"


class TooManyBadSamplesError(RuntimeError):
    """More training samples failed to load than DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION allows."""


class SkipBadSamples:
    """Wrap a dataset mapper so that a sample that fails to load is skipped, within a budget.

    When the wrapped mapper raises one of ``BAD_SAMPLE_ERRORS``, the sample is logged at WARNING
    with its file name and the error, and counted. With ``dataset`` given, the wrapper then maps
    a replacement drawn at random (with a fixed seed) from the dataset's samples that have not
    failed yet. Without it, the wrapper returns None and leaves the replacement to the caller.

    Once ``min(min_samples, len(dataset))`` samples have been read, replacements included, a
    failure that brings the bad samples above ``max_bad_fraction`` of the samples read raises
    ``TooManyBadSamplesError``, chained to that failure. So does a failure when no sample of
    ``dataset`` is left that has not failed (samples are identified by ``file_name``).

    The replacement is drawn here because Detectron2 0.6's ``MapDataset``, which retries when a
    mapper returns None, draws its retry with ``random.sample`` from a set, and Python 3.11
    rejects that with a TypeError.

    NOTE: each data-loader worker process works on its own copy of the wrapper, so the share is
    counted and checked per worker, over the samples that worker has read. The counts also start
    from zero again when a run is resumed.
    """

    @configurable
    def __init__(
        self,
        mapper: Callable[[Dict[str, Any]], Optional[Dict[str, Any]]],
        *,
        max_bad_fraction: float,
        dataset: Optional[Sequence[Dict[str, Any]]] = None,
        min_samples: int = MIN_SAMPLES_BEFORE_CHECK,
    ):
        """
        Args:
            mapper: the mapper to wrap, called with one dataset dict.
            max_bad_fraction: the share (0..1) of the samples read that may fail before the
                run stops (config key DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION).
            dataset: the dataset dicts (a list or Detectron2's ``DatasetFromList``) that
                replacements are drawn from, or None to return None for a bad sample.
            min_samples: the number of samples read before the share is checked.
        """
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"{FRACTION_KEY} must be a fraction in 0..1, got {max_bad_fraction}"
            )
        if min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer, got {min_samples}")
        if dataset is not None and len(dataset) == 0:
            raise ValueError("dataset is empty, so no replacement sample can be drawn")
        self.mapper = mapper
        self.max_bad_fraction = float(max_bad_fraction)
        self.dataset = dataset
        self.min_samples = int(min_samples)
        self.num_read = 0
        self.num_bad = 0
        self._bad_files = set()
        self._rng = random.Random(REPLACEMENT_SEED)

    @classmethod
    def from_config(cls, cfg, mapper, dataset=None) -> Dict[str, Any]:
        return {
            "mapper": mapper,
            "max_bad_fraction": cfg.DATASETS.SKYSA.MAX_BAD_SAMPLE_FRACTION,
            "dataset": dataset,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Map one dataset dict, or a replacement when it fails to load.

        Returns:
            The mapped sample; None for a bad sample when the wrapper has no ``dataset``.

        Raises:
            TooManyBadSamplesError: a failure takes the bad samples over the budget.
        """
        while True:
            self.num_read += 1
            try:
                return self.mapper(dataset_dict)
            except BAD_SAMPLE_ERRORS as e:
                file_name = dataset_dict.get("file_name", "<dataset dict without file_name>")
                self._record_failure(file_name, e)
                if self.dataset is None:
                    return None
                dataset_dict = self._draw_replacement(file_name, e)

    def _too_many(self, reason: str, file_name: str, error: Exception) -> TooManyBadSamplesError:
        return TooManyBadSamplesError(
            f"{self.num_bad} of {self.num_read} training samples read by this process failed "
            f"to load: {reason}. The last failure, {file_name}: {error}. Fix or remove the "
            f"failing files (each was logged at WARNING), or raise {FRACTION_KEY}."
        )

    def _record_failure(self, file_name: str, error: Exception) -> None:
        """Count and log a failed sample, or raise when the failures exceed the budget."""
        self.num_bad += 1
        self._bad_files.add(file_name)

        checked_after = self.min_samples
        if self.dataset is not None:
            checked_after = min(checked_after, len(self.dataset))
        if (
            self.num_read >= checked_after
            and self.num_bad > self.max_bad_fraction * self.num_read
        ):
            reason = f"more than {FRACTION_KEY} = {self.max_bad_fraction} allows"
            raise self._too_many(reason, file_name, error) from error
        logger.warning(
            "Skipped training sample %s (%d of %d samples read by this process failed): %s",
            file_name,
            self.num_bad,
            self.num_read,
            error,
        )

    def _draw_replacement(self, file_name: str, error: Exception) -> Dict[str, Any]:
        """Return a random sample of ``dataset`` whose file has not failed yet."""
        for _ in range(MAX_RANDOM_DRAWS):
            candidate = self.dataset[self._rng.randrange(len(self.dataset))]
            if candidate.get("file_name") not in self._bad_files:
                return candidate
        for index in range(len(self.dataset)):
            candidate = self.dataset[index]
            if candidate.get("file_name") not in self._bad_files:
                return candidate
        reason = f"all {len(self.dataset)} samples of the dataset have failed"
        raise self._too_many(reason, file_name, error) from error
