"""Evaluators for open-vocabulary semantic segmentation."""
