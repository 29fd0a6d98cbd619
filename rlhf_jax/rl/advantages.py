"""From scores to advantages: reward assembly, GAE, masked statistics and whitening.

docs/rlhf_details.md, PPO section. Responses are [B, T] with `response_mask` True up
to and including the first EOS (the sampler's convention, so each row's mask
is a prefix of length `lengths`). Each function treats positions outside the
mask as absent: they are read through `jnp.where` (so NaN or inf there can't
leak, forward or backward) and come out as 0.

Variances are the biased (population) ones, dividing by the number of masked
elements, as in lm-human-preferences' whitening (tf.nn.moments); this keeps a
single-element batch well defined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of the masked elements.

  Args:
    x: [...] float.
    mask: [...] bool, same shape.

  Returns:
    [] float32; 0 when the mask is empty.
  """
  count = jnp.sum(mask.astype(jnp.float32))
  return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0)) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Biased variance of the masked elements (divides by their count).

  Args:
    x: [...] float.
    mask: [...] bool, same shape.

  Returns:
    [] float32; 0 when the mask is empty.
  """
  centred = jnp.where(mask, x.astype(jnp.float32) - masked_mean(x, mask), 0.0)
  return masked_mean(jnp.square(centred), mask)


def whiten(
  x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
  """(x - mean) / sqrt(var + eps) with mean and biased var over all masked elements.

  Statistics are over the whole batch (every masked element of every row), not
  per row. With shift_mean=False the mean is added back, so only the scale
  changes: the form used for optional reward whitening, where the sign of the
  mean reward matters; advantages use shift_mean=True.

  Args:
    x: [B, T] float, e.g. advantages or rewards.
    mask: [B, T] bool response mask.
    shift_mean: whether the output has mean 0 (True) or keeps x's mean.
    eps: added to the variance.

  Returns:
    [B, T] float32, 0 outside the mask.
  """
  x = jnp.where(mask, x.astype(jnp.float32), 0.0)
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


def explained_variance(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - var(target - pred) / var(target) over masked elements (val/var_explained).

  Args:
    pred: [B, T] float value predictions.
    target: [B, T] float returns.
    mask: [B, T] bool response mask.

  Returns:
    [] float32: 1 for perfect predictions, 0 for predicting the mean, negative
    for worse. Defined as 0 when var(target) == 0 (including an empty mask),
    where the ratio is meaningless.
  """
  pred = jnp.where(mask, pred.astype(jnp.float32), 0.0)
  target = jnp.where(mask, target.astype(jnp.float32), 0.0)
  var_target = masked_var(target, mask)
  var_error = masked_var(target - pred, mask)
  safe = jnp.where(var_target > 0, var_target, 1.0)
  return jnp.where(var_target > 0, 1.0 - var_error / safe, 0.0)


def penalize_missing_eos(
  scores: jax.Array, has_eos: jax.Array, missing_eos_score: float | None
) -> jax.Array:
  """Replaces the RM score of responses that never emitted EOS.

  A truncated response was never finished, so the RM's judgement of it is
  unreliable and a fixed penalty (e.g. -1) teaches the policy to stop.

  Args:
    scores: [B] float reward-model scores.
    has_eos: [B] bool, whether each response ended with EOS.
    missing_eos_score: the score given to responses without EOS; None = off.

  Returns:
    [B] float32 scores.
  """
  scores = scores.astype(jnp.float32)
  if missing_eos_score is None:
    return scores
  return jnp.where(has_eos, scores, jnp.float32(missing_eos_score))


def last_token_one_hot(response_mask: jax.Array) -> jax.Array:
  """Marks each row's last response token (index length - 1, the EOS if any).

  Args:
    response_mask: [B, T] bool, a prefix of each row.

  Returns:
    [B, T] bool, one True per non-empty row; an empty row gets none (rather
    than a mark on a pad position).
  """
  t = response_mask.shape[-1]
  lengths = jnp.sum(response_mask.astype(jnp.int32), axis=-1)
  # An empty row's index is -1, which matches no position (no wrap-around).
  return jnp.arange(t)[None, :] == (lengths - 1)[:, None]


def assemble_rewards(
  scores: jax.Array,
  kl: jax.Array,
  response_mask: jax.Array,
  kl_coef: float | jax.Array,
  *,
  has_eos: jax.Array | None = None,
  missing_eos_score: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token PPO rewards: r_t = -kl_coef * kl_t, plus the score at the last token.

  The score goes at index length - 1 (the EOS of a finished response, the
  last sampled token of a truncated one), never on a pad position.

  Args:
    scores: [B] float reward-model scores.
    kl: [B, T] float per-token KL estimates (`kl.kl_penalty`).
    response_mask: [B, T] bool, True up to and including the first EOS.
    kl_coef: [] float, beta (e.g. `KLControllerState.kl_coef`).
    has_eos: [B] bool; needed when missing_eos_score is set.
    missing_eos_score: score for responses without EOS (e.g. -1.0); None = off.

  Returns:
    rewards: [B, T] float32, 0 outside the mask.
    non_score_reward: [B] float32, per-sequence sum of -kl_coef * kl_t
      (objective/non_score_reward is its batch mean).
    scores: [B] float32, the scores actually used (after the EOS penalty).
  """
  if missing_eos_score is not None:
    if has_eos is None:
      raise ValueError("assemble_rewards: missing_eos_score needs has_eos.")
    scores = penalize_missing_eos(scores, has_eos, missing_eos_score)
  scores = scores.astype(jnp.float32)
  kl_reward = jnp.where(response_mask, -jnp.asarray(kl_coef, jnp.float32) * kl, 0.0)
  score_reward = jnp.where(last_token_one_hot(response_mask), scores[:, None], 0.0)
  return kl_reward + score_reward, jnp.sum(kl_reward, axis=-1), scores


def gae(
  rewards: jax.Array,
  values: jax.Array,
  response_mask: jax.Array,
  gamma: float = 1.0,
  lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over response tokens, as a reverse scan.

  delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1},
  with V and A after the last response token taken as 0: the episode ends at
  EOS or truncation, so there is nothing to bootstrap from.

  Args:
    rewards: [B, T] float per-token rewards (`assemble_rewards`).
    values: [B, T] float value predictions V_t (of the rollout policy).
    response_mask: [B, T] bool, a prefix of each row.
    gamma: discount.
    lam: GAE lambda.

  Returns:
    advantages: [B, T] float32, 0 outside the mask.
    returns: [B, T] float32, advantages + values, 0 outside the mask.
  """
  mask = response_mask.astype(jnp.bool_)
  rewards = jnp.where(mask, rewards.astype(jnp.float32), 0.0)
  values = jnp.where(mask, values.astype(jnp.float32), 0.0)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(next_advantage, inputs):
    delta, m = inputs
    # Zeroing off the mask also zeroes the carry into the last real token.
    advantage = jnp.where(m, delta + gamma * lam * next_advantage, 0.0)
    return advantage, advantage

  init = jnp.zeros(rewards.shape[:1], jnp.float32)
  _, advantages = jax.lax.scan(step, init, (deltas.T, mask.T), reverse=True)
  advantages = advantages.T
  return advantages, jnp.where(mask, advantages + values, 0.0)
