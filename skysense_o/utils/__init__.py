"""Utilities shared by the package, the tools and the demo."""
