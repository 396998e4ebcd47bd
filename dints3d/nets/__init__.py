"""Discrete networks built from searched architectures."""
