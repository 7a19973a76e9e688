"""Detectron2 checkpointer that loads safely, matches keys strictly and saves atomically."""

import logging
import os
import secrets
from typing import Any, Dict, Iterable, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from .utils.weights import load_state_dict_checked, load_weights_file

logger = logging.getLogger(__name__)

# Buffers that the modules compute from their configuration. A checkpoint may or may not
# contain them (the release's loader drops them on load), so their absence is not a mismatch.
REGENERATED_BUFFER_SUFFIXES = (
    "relative_position_index",
    "relative_coords_table",
    "swin_block.block_2.attn_mask",
)


def _atomic_write(path: str, write) -> None:
    """Write a file through a temporary file in the same folder and an atomic rename, so a
    reader never finds a partly written file, even after a crash."""
    folder = os.path.dirname(path) or "."
    # A random suffix and O_EXCL give a fresh file. Mode 0o666 leaves the permissions to the
    # umask, as for any other file the run writes (tempfile.mkstemp would force 0o600).
    temporary = os.path.join(folder, f".tmp-{os.path.basename(path)}-{secrets.token_hex(4)}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class SkySenseOCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` with three changes.

    * Files are read with ``weights_only=True`` (or with safetensors), so a checkpoint cannot
      run code; Detectron2's pickled ``.pkl`` model-zoo format is rejected for that reason.
    * The model's keys must match the file's exactly (names and shapes) unless ``strict`` is
      False, in which case mismatches are logged at WARNING and skipped. Deterministic
      buffers that the modules recompute may be absent.
    * ``save`` and ``tag_last_checkpoint`` write atomically: a run killed while saving leaves
      the previous checkpoint and ``last_checkpoint`` intact.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True,
                 save_to_disk: Optional[bool] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict

    # ---- loading -----------------------------------------------------------------------------

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            raise ValueError(
                f"{filename} is a pickle file; unpickling can run arbitrary code, so it is not "
                "loaded. Convert it to a .pth file holding only tensors."
            )
        loaded = load_weights_file(filename)
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{filename} contains a {type(loaded).__name__}; expected a dict of weights"
            )
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        state_dict = checkpoint.pop("model")
        state_dict = self.convert_state_dict(state_dict)
        if all(key.startswith("module.") for key in state_dict):
            state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
        regenerated = [
            key for key in self.model.state_dict() if key.endswith(REGENERATED_BUFFER_SUFFIXES)
        ]
        missing, unexpected = load_state_dict_checked(
            self.model, state_dict, strict=self.strict, source="checkpoint",
            ignore_missing=regenerated,
        )
        # The mismatches were already reported (or raised) above, so nothing is returned for
        # fvcore to log a second time.
        return None

    def convert_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Return ``state_dict`` without the release's entries that inference does not use
        and without stored copies of computed buffers (``skysense_o.release``)."""
        # Imported here because skysense_o.release imports this module.
        from .release import convert_release_state_dict

        return convert_release_state_dict(state_dict, self.model)

    # ---- saving ------------------------------------------------------------------------------

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        check_finite_parameters(self.model, name)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda stream: torch.save(data, stream))
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda stream: stream.write(last_filename_basename.encode()))


def check_finite_parameters(model: torch.nn.Module, checkpoint_name: str) -> None:
    """Raise FloatingPointError when a parameter of ``model`` contains NaN or infinite values.

    A finite loss with non-finite gradients lets the optimizer write NaN into the weights one
    iteration before Detectron2's loss check stops the run. Refusing the save keeps the last
    good checkpoint and ``last_checkpoint`` untouched. Parameters on the meta device are
    skipped because they hold no values.
    """
    non_finite = [
        name
        for name, parameter in model.named_parameters()
        if parameter.is_floating_point()
        and not parameter.is_meta
        and not bool(torch.isfinite(parameter).all())
    ]
    if non_finite:
        shown = ", ".join(non_finite[:5]) + (", ..." if len(non_finite) > 5 else "")
        raise FloatingPointError(
            f"Checkpoint {checkpoint_name!r} was not saved: {len(non_finite)} parameter(s) "
            f"contain NaN or infinite values ({shown}). The last saved checkpoint is kept. Resume "
            "from it with a lower SOLVER.BASE_LR or with SOLVER.CLIP_GRADIENTS enabled."
        )


def list_regenerated_keys(keys: Iterable[str]) -> list:
    """Return the keys of ``keys`` that name recomputed deterministic buffers."""
    return [key for key in keys if key.endswith(REGENERATED_BUFFER_SUFFIXES)]
