"""Datasets, dataset mappers and the visual-relevance graph; importing registers them."""

from . import dataset_mappers, datasets
from .dataset_mappers import MAPPER_REGISTRY
from .graph import VisualRelevanceGraph, load_graph
from .sampling import sample_texts

__all__ = [
    "MAPPER_REGISTRY",
    "VisualRelevanceGraph",
    "dataset_mappers",
    "datasets",
    "load_graph",
    "sample_texts",
]
