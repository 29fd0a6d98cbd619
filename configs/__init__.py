"""Experiment configs: one `get_config(arg=None)` file per run, launched by experiments.launch.

Each file's docstring holds the exact command that runs it, e.g.

  python -m experiments.launch --config=configs/sft.py:runlocal --workdir=/tmp/sft

Config files import only ml_collections (and `configs.common`), never rlhf_jax, so reading a
config never pulls in JAX.
"""
