"""Merge command-line ``KEY VALUE`` config overrides, rejecting unknown keys with a KeyError."""

from __future__ import annotations

import difflib
from typing import Sequence

from detectron2.config import CfgNode

# The files that define the valid keys, named in the error message.
KEY_SOURCES = "skysense_o/config.py and Detectron2's detectron2/config/defaults.py"


def _check_key(cfg: CfgNode, full_key: str) -> None:
    """Raise KeyError when ``full_key`` (dotted, as on the command line) is not a key of cfg."""
    parts = full_key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if isinstance(node, CfgNode) and part in node:
            node = node[part]
            continue
        parent = ".".join(parts[:depth]) or "the config"
        if not isinstance(node, CfgNode):
            raise KeyError(
                f"Unknown config key {full_key}: {parent} is a value, not a group of keys. "
                f"The keys are defined in {KEY_SOURCES}."
            )
        close = difflib.get_close_matches(part, list(node.keys()), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise KeyError(
            f"Unknown config key {full_key}: {parent} has no key {part}.{hint} The keys are "
            f"defined in {KEY_SOURCES}."
        )


def merge_overrides(cfg: CfgNode, opts: Sequence[str]) -> None:
    """Merge ``opts`` (``[KEY, VALUE, KEY, VALUE, ...]``) into ``cfg``.

    yacs's ``merge_from_list`` reports an unknown key with an assert (an AssertionError, which
    ``python -O`` removes) while ``merge_from_file`` raises KeyError. Checking every key first
    makes both report a KeyError, here with the closest existing key names.

    Raises:
        ValueError: ``opts`` has an odd number of entries.
        KeyError: a key does not exist in ``cfg``.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(
            f"Config overrides must be KEY VALUE pairs, got {len(opts)} entries: {opts}"
        )
    for full_key in opts[0::2]:
        # yacs skips deprecated keys and explains renamed ones itself.
        if not (cfg.key_is_deprecated(full_key) or cfg.key_is_renamed(full_key)):
            _check_key(cfg, full_key)
    cfg.merge_from_list(opts)
