"""Training and setup helpers used by train_net.py."""

from .config_overrides import merge_overrides

__all__ = ["merge_overrides"]
