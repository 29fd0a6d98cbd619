"""Best-of-n: sample n responses, keep the one the reward model scores highest.

The cheapest way to spend a reward model, and the baseline every RL method
is compared with (Nakano et al. 2021; Gao et al. 2022). Its KL to the
sampling policy has a closed form, so best-of-n places points on the
gold-vs-sqrt(KL) plot without any training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln


def analytic_kl(n: int | jax.Array) -> jax.Array:
  """KL(best-of-n || base policy) = log n - (n - 1) / n, in nats (0 for n = 1).

  Exact for a continuous proxy (no ties); an upper bound otherwise
  (Beirami et al. 2024).
  """
  n = jnp.asarray(n, jnp.float32)
  return jnp.log(n) - (n - 1.0) / n


def best_index(scores: jax.Array) -> jax.Array:
  """Index of the best of the n candidates: scores [..., n] -> [...] int32 (first on ties)."""
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def select(values: jax.Array, scores: jax.Array) -> jax.Array:
  """values [..., n, *rest] of the highest-scoring candidate -> [..., *rest]."""
  index = best_index(scores)
  index = index.reshape(index.shape + (1,) * (values.ndim - scores.ndim + 1))
  return jnp.take_along_axis(values, index, axis=scores.ndim - 1).squeeze(scores.ndim - 1)


def selection_weights(num_samples: int, n: int) -> jax.Array:
  """P(the i-th lowest of N scored samples is the best of a random n-subset): [N].

  With the samples sorted by score (ascending, rank i = 1..N), the best of a
  uniformly drawn n-subset is sample i with probability C(i-1, n-1) / C(N, n).
  Averaging any per-sample quantity with these weights is the unbiased
  estimate of its expectation under best-of-n that uses all N samples, far
  less noisy than drawing disjoint groups (Gao et al. 2022, appendix).
  """
  if not 1 <= n <= num_samples:
    raise ValueError(f"n={n} must be in [1, num_samples={num_samples}].")
  i = jnp.arange(1, num_samples + 1, dtype=jnp.float32)
  log_choose = lambda a, b: gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)
  k = jnp.maximum(i - 1.0, n - 1.0)  # keeps the log finite where the weight is 0 (i < n)
  log_w = log_choose(k, n - 1.0) - log_choose(float(num_samples), float(n))
  return jnp.where(i >= n, jnp.exp(log_w), 0.0)


def expected_best_of_n(scores: jax.Array, values: jax.Array, n: int) -> jax.Array:
  """Unbiased E[value of the best-of-n choice] from N >= n scored samples per prompt.

  Args:
    scores: [P, N] proxy (reward-model) scores of N samples for each of P prompts.
    values: [P, N] the quantity to average (gold reward, proxy score, length, ...).
    n: best-of-n size, 1 <= n <= N.
  Returns:
    [P] the expectation, per prompt, over random n-subsets of the N samples.
  """
  order = jnp.argsort(scores, axis=-1)
  sorted_values = jnp.take_along_axis(values, order, axis=-1)
  weights = selection_weights(scores.shape[-1], n)
  return jnp.sum(sorted_values * weights, axis=-1)
