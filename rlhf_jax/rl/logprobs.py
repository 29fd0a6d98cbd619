"""Per-token log-probabilities: the training path every algorithm shares.

The sampler and every trainer go through `token_logprobs`, so the log-probs
recomputed for PPO/GRPO/DPO use the same temperature scaling as sampling
(dividing logits by a different temperature is a classic PPO bug).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[target], in float32.

  Args:
    logits: [..., V] unnormalised scores (any float dtype).
    targets: [...] int token ids.
    temperature: the sampling temperature; must be > 0.

  Returns:
    [...] float32 log-probabilities.
  """
  logits = logits.astype(jnp.float32) / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - logz


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / temperature): [..., V] -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def shift_for_next_token(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Targets and their mask for next-token prediction from logits of `tokens`.

  Logit t predicts token t + 1, so targets are tokens shifted left by one and
  the last position has no target.

  Args:
    tokens: [B, T] int.
    mask: [B, T] bool/int, which targets count (e.g. response tokens only).

  Returns:
    targets [B, T] int32 and target_mask [B, T] bool (False at t = T - 1).
  """
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  target_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  return targets.astype(jnp.int32), target_mask.astype(jnp.bool_)
