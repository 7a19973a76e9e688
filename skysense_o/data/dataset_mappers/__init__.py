"""Dataset mappers: turn a dataset dict into the inputs of the model; importing registers them."""

from detectron2.utils.registry import Registry

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = """
Registry of dataset mappers, looked up by name: the training mapper by
cfg.INPUT.DATASET_MAPPER_NAME ("skysa_semantic"), the test mapper as "skysense_test".
A registered class is built as ``cls(cfg, is_train)`` and called on one dataset dict.
"""

# The modules below register their mappers in MAPPER_REGISTRY, so they come after it.
from .skysa_semantic_mapper import SkySASemanticDatasetMapper  # noqa: E402
from .test_mapper import SkySenseTestDatasetMapper  # noqa: E402

__all__ = ["MAPPER_REGISTRY", "SkySASemanticDatasetMapper", "SkySenseTestDatasetMapper"]
