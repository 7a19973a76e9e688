"""Safe loading of weight files and strict, reported loading of state dicts.

Every weight file that a user supplies goes through ``load_weights_file``: safetensors files are
read with safetensors, and any other file with ``torch.load(weights_only=True)``, so loading a
checkpoint can never run code stored in it.
"""

import logging
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# How many key names an error or a log line lists before it only gives the count.
_SHOWN_KEYS = 10


class CheckpointMismatchError(RuntimeError):
    """A state dict does not match the module it is loaded into."""


def load_weights_file(path: PathLike, *, mmap: bool = False) -> Any:
    """Load a weight file without executing any code stored in it.

    Args:
        path: a ``.safetensors`` file or a file written by ``torch.save``.
        mmap: map a ``torch.save`` file into memory instead of reading it, so that loading a
            large checkpoint does not need a second copy of its tensors in RAM.

    Returns:
        For safetensors, a dict of tensors. Otherwise the saved object (dicts, lists, strings,
        numbers and tensors).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file stores Python objects other than plain containers and tensors
            (a pickled class or callable), or is not a weight file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} stores Python objects other than tensors and plain containers, so it was "
            "not loaded: unpickling such objects can run arbitrary code. Re-save only the "
            "weights (for example torch.save({'model': model.state_dict()}, path)) or convert "
            f"the file to safetensors. Details: {error}"
        ) from error
    except RuntimeError as error:
        if mmap and "mmap" in str(error):
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            return load_weights_file(path, mmap=False)
        raise ValueError(f"{path} could not be read as a PyTorch weight file: {error}") from error


def extract_state_dict(
    checkpoint: Any, container_keys: Sequence[str] = ("state_dict", "model", "module")
) -> Dict[str, torch.Tensor]:
    """Return the state dict stored in ``checkpoint``.

    A checkpoint is either a state dict itself or a dict that holds one under one of
    ``container_keys`` (Detectron2 uses "model", open_clip and Lightning "state_dict").
    A "module." prefix, which ``DistributedDataParallel`` adds, is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a dict of tensors, found a {type(checkpoint).__name__}")
    state = checkpoint
    for key in container_keys:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"no tensors found in the checkpoint; top-level keys: {sorted(checkpoint)[:_SHOWN_KEYS]}"
        )
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return tensors


def _shown(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:_SHOWN_KEYS])
    if len(keys) > _SHOWN_KEYS:
        text += f", ... ({len(keys) - _SHOWN_KEYS} more)"
    return text


def compare_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = ()
) -> Tuple[List[str], List[str], List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]]:
    """Compare ``state_dict`` with ``module.state_dict()``.

    Returns:
        (missing, unexpected, shape_mismatches), where a shape mismatch is
        (key, shape in the file, shape in the module). Keys in ``ignore`` are left out.
    """
    ignored = set(ignore)
    expected = {k: v for k, v in module.state_dict().items() if k not in ignored}
    given = {k: v for k, v in state_dict.items() if k not in ignored}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        (key, tuple(given[key].shape), tuple(expected[key].shape))
        for key in sorted(set(given) & set(expected))
        if tuple(given[key].shape) != tuple(expected[key].shape)
    ]
    return missing, unexpected, mismatched


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "checkpoint",
    ignore_missing: Iterable[str] = (),
) -> Tuple[List[str], List[str]]:
    """Load ``state_dict`` into ``module``, reporting every key that does not match.

    Args:
        module: the module to load into.
        state_dict: name to tensor.
        strict: raise ``CheckpointMismatchError`` when keys are missing or unexpected or a shape
            differs. With ``strict=False`` the matching tensors are loaded, mismatching ones are
            skipped, and everything is logged at WARNING.
        source: what the weights are, for messages (usually the file name).
        ignore_missing: keys that may be absent because the module computes them itself
            (deterministic buffers).

    Returns:
        (missing, unexpected) key lists, after ``ignore_missing``.
    """
    ignore_missing = set(ignore_missing)
    missing, unexpected, mismatched = compare_state_dict(module, state_dict)
    missing = [key for key in missing if key not in ignore_missing]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_shown(unexpected)}")
    if mismatched:
        shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:_SHOWN_KEYS])
        problems.append(f"{len(mismatched)} shape mismatch(es): {shown}")
    if problems and strict:
        raise CheckpointMismatchError(
            f"{source} does not match the model: " + "; ".join(problems) + ". Check that the "
            "config describes the architecture the weights were trained with, or load "
            "non-strictly if a partial load is intended."
        )
    for problem in problems:
        logger.warning("loading %s: %s", source, problem)
    mismatched_keys = {key for key, _, _ in mismatched}
    loadable = {k: v for k, v in state_dict.items() if k not in mismatched_keys}
    module.load_state_dict(loadable, strict=False)
    logger.info("loaded %d tensors from %s", len(loadable) - len(unexpected), source)
    return missing, unexpected


def load_module_weights(
    module: nn.Module, path: PathLike, *, strict: bool = True,
    ignore_missing: Optional[Iterable[str]] = None,
) -> Tuple[List[str], List[str]]:
    """Load the state dict stored in the weight file ``path`` into ``module``."""
    state_dict = extract_state_dict(load_weights_file(path))
    return load_state_dict_checked(
        module, state_dict, strict=strict, source=str(path), ignore_missing=ignore_missing or ()
    )
