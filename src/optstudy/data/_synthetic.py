"""Placeholder: filled in by a helper."""

DATASETS = {}
