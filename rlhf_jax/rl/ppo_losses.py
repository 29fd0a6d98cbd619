"""PPO losses for language models: clipped policy loss, clipped value loss, entropy.

docs/rlhf_details.md, PPO section. Every per-token quantity is reduced by one
`aggregate` helper, so a config's `loss_aggregation` means the same thing for
the policy loss, the value loss and the entropy:
  "token_mean"      sum over all response tokens / their number (long
                    responses weigh more, per token)
  "sequence_mean"   mean over sequences of each sequence's token mean (every
                    response weighs the same, whatever its length)
  "token_sum_norm"  sum over all response tokens / (B * T), a constant
                    normaliser independent of lengths (Dr. GRPO)
Statistics (clip fractions, approximate KL) are always token means.

Positions outside `response_mask` are read through `jnp.where`, so NaN or
inf there reaches neither the loss nor its gradient.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.rl.advantages import masked_mean
from rlhf_jax.rl.logprobs import entropy_from_logits

Aggregation = Literal["token_mean", "sequence_mean", "token_sum_norm"]


def aggregate(values: jax.Array, mask: jax.Array, mode: Aggregation = "token_mean") -> jax.Array:
  """Reduces per-token values to a scalar loss (see the module docstring).

  Args:
    values: [B, T] float per-token losses.
    mask: [B, T] bool response mask.
    mode: "token_mean", "sequence_mean" or "token_sum_norm".

  Returns:
    [] float32; 0 for an empty mask. "sequence_mean" averages over non-empty
    rows only, so a fully-masked row neither counts nor divides by zero.
  """
  values = jnp.where(mask, values.astype(jnp.float32), 0.0)
  mask_f = mask.astype(jnp.float32)
  if mode == "token_mean":
    return jnp.sum(values) / jnp.maximum(jnp.sum(mask_f), 1.0)
  if mode == "sequence_mean":
    lengths = jnp.sum(mask_f, axis=-1)
    row_means = jnp.sum(values, axis=-1) / jnp.maximum(lengths, 1.0)
    return jnp.sum(row_means) / jnp.maximum(jnp.sum(lengths > 0), 1)
  if mode == "token_sum_norm":
    return jnp.sum(values) / values.size
  raise ValueError(
    f"Unknown loss aggregation {mode!r}; expected 'token_mean', 'sequence_mean' or "
    "'token_sum_norm'."
  )


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  advantages: jax.Array,
  response_mask: jax.Array,
  *,
  clip_eps: float = 0.2,
  mode: Aggregation = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate: per token max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

  ratio = exp(logp - old_logp). The max is the pessimistic bound: clipping only
  removes the incentive to move the ratio further in the advantage's direction.

  Args:
    logp: [B, T] float log-probs of the response tokens under the current policy.
    old_logp: [B, T] float log-probs under the rollout policy.
    advantages: [B, T] float (usually whitened) advantages.
    response_mask: [B, T] bool.
    clip_eps: the clip range eps.
    mode: loss aggregation (`aggregate`).

  Returns:
    loss: [] float32.
    stats: [] float32 token means over the mask:
      "clipfrac": fraction of tokens where the clipped term is the larger;
      "approxkl": 0.5 * mean((logp - old_logp)^2) (the N details' form);
      "approxkl_k3": mean((ratio - 1) - log ratio), the k3 estimate of
        KL(old || current) under the rollout samples.
  """
  mask = response_mask.astype(jnp.bool_)
  log_ratio = jnp.where(mask, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
  advantages = jnp.where(mask, advantages.astype(jnp.float32), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(unclipped, clipped), mask, mode)
  stats = {
    "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
    "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
    "approxkl_k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
  }
  return loss, stats


def value_loss(
  values: jax.Array,
  old_values: jax.Array,
  returns: jax.Array,
  response_mask: jax.Array,
  *,
  clip_eps: float = 0.2,
  mode: Aggregation = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss: 0.5 * aggregate of max((V - R)^2, (V_clipped - R)^2).

  V_clipped = V_old + clip(V - V_old, -eps, eps); as with the policy, the max
  keeps the loss from rewarding value moves beyond the trust region.

  Args:
    values: [B, T] float current value predictions.
    old_values: [B, T] float value predictions at rollout time.
    returns: [B, T] float GAE returns (`advantages.gae`).
    response_mask: [B, T] bool.
    clip_eps: the value clip range eps_v (in reward units).
    mode: loss aggregation (`aggregate`).

  Returns:
    loss: [] float32.
    stats: [] float32 token means over the mask:
      "clipfrac": fraction of tokens where the clipped error is the larger
        (val/clipfrac);
      "vpred": mean of values (val/vpred);
      "error": mean of (values - returns)^2 (val/error).
  """
  mask = response_mask.astype(jnp.bool_)
  values = jnp.where(mask, values.astype(jnp.float32), 0.0)
  old_values = jnp.where(mask, old_values.astype(jnp.float32), 0.0)
  returns = jnp.where(mask, returns.astype(jnp.float32), 0.0)
  values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped = jnp.square(values - returns)
  clipped = jnp.square(values_clipped - returns)
  loss = 0.5 * aggregate(jnp.maximum(unclipped, clipped), mask, mode)
  stats = {
    "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
    "vpred": masked_mean(values, mask),
    "error": masked_mean(unclipped, mask),
  }
  return loss, stats


def masked_entropy(
  logits: jax.Array,
  response_mask: jax.Array,
  *,
  temperature: float = 1.0,
  mode: Aggregation = "token_mean",
) -> jax.Array:
  """Mean entropy of the policy over response positions (policy/entropy).

  Args:
    logits: [B, T, V] logits that predict the response tokens.
    response_mask: [B, T] bool.
    temperature: the sampling temperature (logits are divided by it).
    mode: aggregation (`aggregate`).

  Returns:
    [] float32.
  """
  mask = response_mask.astype(jnp.bool_)
  # Zeroing pad logits first keeps NaN there out of the gradient as well.
  logits = jnp.where(mask[..., None], logits.astype(jnp.float32), 0.0)
  return aggregate(entropy_from_logits(logits, temperature), mask, mode)
