"""SkySense-O: open-vocabulary semantic segmentation of remote-sensing images on Detectron2.

Importing the package registers its components (meta-architecture, backbones, decoders,
dataset mappers, datasets and evaluators) with the registries; it reads no files and changes
no global state.
"""

from . import data, evaluation, modeling
from .config import add_skysense_o_config

__all__ = ["add_skysense_o_config", "data", "evaluation", "modeling"]
