"""Dataset registrations in Detectron2's DatasetCatalog and MetadataCatalog."""

from . import register_benchmarks  # noqa: F401  (registers the benchmark test sets)
from . import register_folder, register_skysa
from .register_folder import register_folder_dataset
from .register_skysa import register_skysa_folder, unregister_dataset

__all__ = [
    "register_folder",
    "register_folder_dataset",
    "register_skysa",
    "register_skysa_folder",
    "unregister_dataset",
]
