"""rlhf_jax: RLHF on language models in JAX/Flax, with a synthetic human-feedback testbed."""

__version__ = "0.1.0"
