"""Placeholder: filled in by a helper."""

MODELS = {}
