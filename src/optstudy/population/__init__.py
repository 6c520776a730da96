"""Populations: K configurations of one model trained at once, stacked on a leading member dimension."""
