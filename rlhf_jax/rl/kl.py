"""KL to the reference policy: per-token estimators, the objective KL, KL controllers.

docs/rlhf_details.md, PPO section. With logr = logp - ref_logp on tokens sampled from
the policy pi, each estimator's expectation under pi relates to KL(pi || ref):
  k1 = logr                       unbiased, high variance, can be negative
  k2 = logr^2 / 2                 biased, low variance, >= 0
  k3 = exp(-logr) - 1 + logr      unbiased, low variance, >= 0
(k3 is unbiased because E_pi[ref / pi] = 1.) The objective KL that is logged
and fed to the adaptive controller is the batch mean of each sequence's sum.

Controllers are pure: a `KLControllerState` (a pytree holding one float32
scalar, so it checkpoints with the train state) and update functions that are
safe to call under jit.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

KLKind = Literal["k1", "k2", "k3"]


def kl_penalty(
  logp: jax.Array, ref_logp: jax.Array, kind: KLKind = "k1", mask: jax.Array | None = None
) -> jax.Array:
  """Per-token KL(pi || ref) estimate from log-probs of tokens sampled from pi.

  Args:
    logp: [B, T] float log-probs of the sampled tokens under the policy.
    ref_logp: [B, T] float log-probs of the same tokens under the reference.
    kind: "k1", "k2" or "k3" (see the module docstring).
    mask: optional [B, T] bool response mask; positions outside it are 0
      (whatever the inputs hold there, even inf or NaN).

  Returns:
    [B, T] float32 per-token estimates.
  """
  logr = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
  if mask is not None:
    # Before exp, so garbage at pad positions can't become inf/NaN (or NaN grads).
    logr = jnp.where(mask, logr, 0.0)
  if kind == "k1":
    return logr
  if kind == "k2":
    return 0.5 * jnp.square(logr)
  if kind == "k3":
    return jnp.expm1(-logr) + logr
  raise ValueError(f"Unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'.")


def sequence_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-sequence KL: the masked sum of per-token estimates.

  Args:
    kl: [B, T] float per-token estimates (from `kl_penalty`).
    mask: [B, T] bool response mask.

  Returns:
    [B] float32; 0 for a fully-masked row.
  """
  return jnp.sum(jnp.where(mask, kl.astype(jnp.float32), 0.0), axis=-1)


def objective_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
  """The logged objective/kl: batch mean of the per-sequence masked sum.

  Args:
    kl: [B, T] float per-token estimates (from `kl_penalty`).
    mask: [B, T] bool response mask.

  Returns:
    [] float32. Every row counts in the mean (a fully-masked row adds 0).
  """
  return jnp.mean(sequence_kl(kl, mask))


class KLControllerState(NamedTuple):
  """The KL coefficient beta as a float32 scalar array (a checkpointable pytree)."""

  kl_coef: jax.Array


def init_kl_controller(kl_coef: float | jax.Array) -> KLControllerState:
  """Initial controller state with beta = kl_coef."""
  return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def fixed_kl_update(
  state: KLControllerState, kl: jax.Array, num_episodes: int | jax.Array
) -> KLControllerState:
  """Fixed controller: beta never moves (same signature as `adaptive_kl_update`)."""
  del kl, num_episodes
  return state


def adaptive_kl_update(
  state: KLControllerState,
  kl: jax.Array,
  num_episodes: int | jax.Array,
  *,
  target: float,
  horizon: float = 10000.0,
) -> KLControllerState:
  """Adaptive controller of Ziegler et al. (2019), one step.

  e = clip(kl / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon).
  The clip bounds how far one noisy batch can move beta; n / horizon makes the
  rate per episode rather than per step, so batch size doesn't change it.

  Args:
    state: current `KLControllerState`.
    kl: [] float, the batch's objective KL (`objective_kl`, per-sequence sum).
    num_episodes: n, the number of episodes (sequences) in the batch.
    target: the KL to steer towards (same units as `kl`), a Python number > 0.
    horizon: episodes over which a constant error changes beta by about e; > 0.
      With n > 5 horizon a batch below target would make beta negative (trainers
      refuse such configs).

  Returns:
    The new `KLControllerState`.
  """
  if not (isinstance(target, int | float) and target > 0):
    raise ValueError(f"The adaptive KL controller needs a target > 0, got {target!r}.")
  if not (isinstance(horizon, int | float) and horizon > 0):
    raise ValueError(f"The adaptive KL controller needs a horizon > 0, got {horizon!r}.")
  error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  factor = 1.0 + error * jnp.asarray(num_episodes, jnp.float32) / horizon
  return KLControllerState(kl_coef=state.kl_coef * factor)


def update_kl_controller(
  state: KLControllerState,
  kl: jax.Array,
  num_episodes: int | jax.Array,
  *,
  kind: Literal["fixed", "adaptive"],
  target: float | None = None,
  horizon: float = 10000.0,
) -> KLControllerState:
  """Dispatches on a config's controller kind ("fixed" or "adaptive")."""
  if kind == "fixed":
    return fixed_kl_update(state, kl, num_episodes)
  if kind == "adaptive":
    if target is None:
      raise ValueError("The adaptive KL controller needs a target KL.")
    return adaptive_kl_update(state, kl, num_episodes, target=target, horizon=horizon)
  raise ValueError(f"Unknown KL controller {kind!r}; expected 'fixed' or 'adaptive'.")
