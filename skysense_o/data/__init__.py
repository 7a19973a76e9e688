"""Datasets, dataset mappers and the visual-relevance graph; importing registers them."""
