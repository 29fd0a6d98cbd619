"""Flax Linen networks: the only package that imports flax.linen."""
