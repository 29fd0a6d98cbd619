"""Tests for rlhf_jax; a package so fixtures import as `tests.fixtures.<name>`."""
