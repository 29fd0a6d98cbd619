"""Critic-free policy gradients with a group baseline: GRPO, Dr. GRPO and RLOO.

docs/rlhf_details.md, critic-free section. Each prompt is sampled G times and the
rollout batch holds the G samples of a prompt as one consecutive block of rows
(prompt i at rows [i * G, (i + 1) * G)). Every response gets one scalar
reward, and its advantage is that reward measured against the other samples
of its group, so no value network is needed:

  "grpo"   A_i = (r_i - mean_group) / (std_group + 1e-4)   (DeepSeekMath)
           std is the unbiased (Bessel) group std, as TRL computes it;
           with scale=False, A_i = r_i - mean_group (Dr. GRPO, Liu et al. 2025:
           dividing by the std up-weights prompts that are too easy or too hard).
  "rloo"   A_i = r_i - mean_{j != i} r_j                    (Ahmadian et al. 2024)
           the leave-one-out baseline, so a sample never baselines itself;
           equal to G / (G - 1) * (r_i - mean_group).

The sequence advantage is broadcast over the response tokens and fed to the
clipped surrogate (`ppo_losses.policy_loss`). The KL to the reference enters
either as a loss term, beta * aggregate(k3_t) (GRPO's way, `kl_loss`), or in
the reward, r - beta * sum_t k1_t (RLOO's way, `kl_shaped_rewards`).

As a loss, an estimator is judged by its gradient, not its value. On tokens
sampled from pi with the sampling held fixed (a minibatch at ratio 1), the
loss E_pi[k(logr)], logr = logp - ref_logp, has gradient E_pi[k'(logr) grad logp]:
  k1 = logr                     E_pi[grad logp] = 0: no pull, only noise
  k2 = logr^2 / 2               E_pi[logr grad logp] = grad KL(pi || ref)
  k3 = exp(-logr) - 1 + logr    E_pi[(1 - ref / pi) grad logp] = -E_ref[grad logp]
                                = grad KL(ref || pi)
So k1 is refused as a loss, and k3, although its value estimates KL(pi || ref)
without bias, descends the forward KL(ref || pi); both KLs vanish only at
pi = ref. Per token, these are gradients of each position's KL given its
prefix with the prefix distribution held fixed: the KL's dependence on which
prefixes the policy reaches is not differentiated.

Pure, jittable functions. Shape legend: B rollout rows (prompts * G), G group
size, T response tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses

AdvantageKind = Literal["grpo", "rloo"]
ADVANTAGE_KINDS = ("grpo", "rloo")
STD_EPS = 1e-4
K1_LOSS_ERROR = (
  "The KL estimator 'k1' cannot be a loss term: on tokens sampled from the policy its expected "
  "gradient is E_pi[grad log pi] = 0, so it adds noise and no pull towards the reference. Use "
  "'k3' (gradient of KL(ref || pi)) or 'k2' (gradient of KL(pi || ref)), or put k1 in the reward."
)


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [B / G, G] float32, checking the shapes (static, so this raises at trace time)."""
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be [B], got shape {rewards.shape}.")
  if not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"group_size must be an int >= 2 (a baseline needs others), got {group_size}.")
  if rewards.shape[0] % group_size:
    raise ValueError(
      f"{rewards.shape[0]} rewards do not split into groups of {group_size}: B % G must be 0."
    )
  return rewards.astype(jnp.float32).reshape(-1, group_size)


def group_advantages(
  rewards: jax.Array,
  group_size: int,
  kind: AdvantageKind = "grpo",
  *,
  scale: bool = True,
  eps: float = STD_EPS,
) -> jax.Array:
  """Per-sequence advantages from each response's reward and its group (module docstring).

  Args:
    rewards: [B] float rewards, B = prompts * G, groups as consecutive blocks of G.
    group_size: G >= 2.
    kind: "grpo" (group mean, optionally divided by the group std) or "rloo"
      (mean of the other G - 1).
    scale: "grpo" only: divide by (std_group + eps); False is Dr. GRPO.
    eps: added to the std, so a group of identical rewards gets advantages 0
      rather than NaN.

  Returns:
    [B] float32 advantages; each group's advantages sum to 0.
  """
  groups = _groups(rewards, group_size)
  mean = jnp.mean(groups, axis=1, keepdims=True)
  if kind == "grpo":
    advantages = groups - mean
    if scale:
      advantages = advantages / (jnp.std(groups, axis=1, keepdims=True, ddof=1) + eps)
  elif kind == "rloo":
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    advantages = groups - others
  else:
    raise ValueError(f"Unknown advantage kind {kind!r}; expected one of {ADVANTAGE_KINDS}.")
  return advantages.reshape(-1)


def group_reward_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
  """The spread of rewards within groups (TRL's reward_std, frac_reward_zero_std).

  Args:
    rewards: [B] float, groups as consecutive blocks of G.
    group_size: G >= 2.

  Returns:
    "reward_std": [] mean over groups of the unbiased within-group std;
    "frac_reward_zero_std": [] fraction of groups whose rewards are all equal
      (they carry no learning signal under any group baseline).
  """
  groups = _groups(rewards, group_size)
  std = jnp.std(groups, axis=1, ddof=1)
  zero = jnp.all(groups == groups[:, :1], axis=1)
  return {
    "reward_std": jnp.mean(std),
    "frac_reward_zero_std": jnp.mean(zero.astype(jnp.float32)),
  }


def token_advantages(advantages: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Broadcasts sequence advantages over the response tokens.

  Args:
    advantages: [B] float, one per response.
    response_mask: [B, T] bool.

  Returns:
    [B, T] float32: each row's advantage on its response tokens, 0 elsewhere.
  """
  advantages = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], response_mask.shape)
  return jnp.where(response_mask, advantages, 0.0)


def kl_loss(
  logp: jax.Array,
  ref_logp: jax.Array,
  response_mask: jax.Array,
  *,
  estimator: kl_lib.KLKind = "k3",
  mode: ppo_losses.Aggregation = "token_mean",
  as_loss: bool = True,
) -> jax.Array:
  """The KL-to-reference loss term: per-token estimates aggregated like the policy loss.

  GRPO adds beta times this to the clipped surrogate. With k3 (the default)
  every token's term is >= 0 and its expected gradient on policy samples is
  that of KL(ref || pi); k2's is that of KL(pi || ref); k1's is 0, so k1 is
  refused unless the value is only logged (module docstring).

  Args:
    logp: [B, T] float log-probs of the sampled tokens under the current policy.
    ref_logp: [B, T] float log-probs under the frozen reference (no gradient).
    response_mask: [B, T] bool; pad positions count for nothing, NaN there included.
    estimator: "k1", "k2" or "k3" (`kl.kl_penalty`).
    mode: loss aggregation (`ppo_losses.aggregate`), the policy loss's.
    as_loss: the value is differentiated; False where it is only logged (the
      KL is in the reward), which allows k1.

  Returns:
    [] float32 (unscaled by beta).

  Raises:
    ValueError: estimator "k1" with as_loss=True (`K1_LOSS_ERROR`).
  """
  if as_loss and estimator == "k1":
    raise ValueError(K1_LOSS_ERROR)
  mask = response_mask.astype(jnp.bool_)
  per_token = kl_lib.kl_penalty(logp, jax.lax.stop_gradient(ref_logp), estimator, mask)
  return ppo_losses.aggregate(per_token, mask, mode)


def kl_shaped_rewards(
  scores: jax.Array,
  logp: jax.Array,
  ref_logp: jax.Array,
  response_mask: jax.Array,
  kl_coef: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Sequence rewards with the KL in the reward: r = score - beta * sum_t k1_t.

  Args:
    scores: [B] float sequence scores (reward model, gold, a Python function).
    logp: [B, T] float log-probs of the sampled tokens under the rollout policy.
    ref_logp: [B, T] float log-probs under the reference.
    response_mask: [B, T] bool.
    kl_coef: beta.

  Returns:
    rewards: [B] float32.
    sequence_kl: [B] float32, sum over response tokens of k1 = logp - ref_logp.
  """
  mask = response_mask.astype(jnp.bool_)
  seq_kl = kl_lib.sequence_kl(kl_lib.kl_penalty(logp, ref_logp, "k1", mask), mask)
  return scores.astype(jnp.float32) - jnp.asarray(kl_coef, jnp.float32) * seq_kl, seq_kl
