"""Flax Linen networks: the only package that imports flax.linen."""

from rlhf_jax.models.config import CONFIG_SPEC, PRESETS, ModelConfig, get_model_config
from rlhf_jax.models.transformer import (
  CACHE_AXES,
  LanguageModel,
  ScalarModel,
  Transformer,
  causal_attention_mask,
  grow_trunk,
  init_cache,
  init_params,
  positions_from_mask,
  positions_from_segments,
  reward_model,
  segment_attention_mask,
  value_model,
)

__all__ = [
  "CACHE_AXES",
  "CONFIG_SPEC",
  "PRESETS",
  "LanguageModel",
  "ModelConfig",
  "ScalarModel",
  "Transformer",
  "causal_attention_mask",
  "get_model_config",
  "grow_trunk",
  "init_cache",
  "init_params",
  "positions_from_mask",
  "positions_from_segments",
  "reward_model",
  "segment_attention_mask",
  "value_model",
]
