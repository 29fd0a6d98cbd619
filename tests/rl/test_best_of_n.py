"""Best-of-n: analytic KL, selection, and the unbiased all-samples estimator."""

import itertools
import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import best_of_n


def test_analytic_kl_hand_values():
  np.testing.assert_allclose(best_of_n.analytic_kl(1), 0.0, atol=1e-7)
  np.testing.assert_allclose(best_of_n.analytic_kl(2), math.log(2) - 0.5, rtol=1e-6)
  np.testing.assert_allclose(best_of_n.analytic_kl(64), math.log(64) - 63 / 64, rtol=1e-6)


def test_analytic_kl_matches_the_exact_kl_of_best_of_n_on_a_uniform_base():
  """Base: uniform over K outcomes with distinct scores; best-of-n has a closed form too."""
  k, n = 2000, 4
  ranks = np.arange(1, k + 1) / k  # CDF at each outcome, ascending score
  p_best = ranks**n - (ranks - 1 / k) ** n  # P(max of n draws is this outcome)
  exact = float(np.sum(p_best * np.log(p_best * k)))
  # The formula is the continuous limit; K = 2000 outcomes is close to it.
  np.testing.assert_allclose(best_of_n.analytic_kl(n), exact, rtol=2e-3)


def test_select_takes_the_highest_score_first_on_ties():
  scores = jnp.array([[0.1, 0.9, 0.3], [2.0, 2.0, 1.0]])
  values = jnp.array([[10, 11, 12], [20, 21, 22]])
  np.testing.assert_array_equal(best_of_n.best_index(scores), [1, 0])
  np.testing.assert_array_equal(best_of_n.select(values, scores), [11, 20])
  # Trailing dimensions (e.g. tokens [P, n, T]) come along.
  tokens = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(best_of_n.select(tokens, scores), tokens[jnp.array([0, 1]), [1, 0]])


def test_selection_weights_hand_example():
  # N = 4, n = 2: C(i-1, 1) / C(4, 2) = (0, 1, 2, 3) / 6.
  np.testing.assert_allclose(best_of_n.selection_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6], atol=1e-6)
  np.testing.assert_allclose(best_of_n.selection_weights(5, 1), [0.2] * 5, atol=1e-6)
  np.testing.assert_allclose(best_of_n.selection_weights(5, 5), [0, 0, 0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(np.sum(best_of_n.selection_weights(128, 17)), 1.0, rtol=1e-4)
  with pytest.raises(ValueError, match="n=6"):
    best_of_n.selection_weights(5, 6)


def test_selection_weights_match_exact_rationals_at_large_n():
  # float32 log-gamma differences cancelled to errors of ~1e-4 at N = 128 and ~1% at N = 4096.
  for n in (1, 2, 17, 64, 127, 128):
    weights = np.asarray(best_of_n.selection_weights(128, n), np.float64)
    assert abs(np.sum(weights) - 1.0) < 1e-6, n
  num = 4096
  for n in (2, 64, 2048):
    weights = np.asarray(best_of_n.selection_weights(num, n), np.float64)
    assert abs(np.sum(weights) - 1.0) < 1e-6, n
    for i in (n, n + 1, num // 2 + n // 2, num - 100, num - 1, num):
      exact = float(Fraction(math.comb(i - 1, n - 1), math.comb(num, n)))
      if exact > 1e-30:  # float32 subnormals keep no relative precision
        assert abs(weights[i - 1] - exact) < 1e-5 * exact, (n, i)
      else:
        assert weights[i - 1] < 1e-29, (n, i)


def test_expected_best_of_n_breaks_ties_like_select():
  """Among tied top scores both pick the lowest index, so n = N is exactly `select`."""
  scores = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 5.0, 5.0]])
  values = jnp.array([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], [7.0, 6.0, 5.0, 4.0]])
  np.testing.assert_allclose(
    best_of_n.expected_best_of_n(scores, values, 4), best_of_n.select(values, scores), rtol=1e-6
  )
  np.testing.assert_allclose(best_of_n.select(values, scores), [20.0, 1.0, 5.0])
  # Every n agrees with drawing each subset and keeping its first top-scored sample.
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 3, size=(4, 6)).astype(np.float32)
  values = rng.normal(size=(4, 6)).astype(np.float32)
  for n in range(1, 7):
    got = best_of_n.expected_best_of_n(jnp.asarray(scores), jnp.asarray(values), n)
    for p in range(4):
      subsets = itertools.combinations(range(6), n)  # each in increasing index order
      want = np.mean([values[p, max(s, key=lambda j: scores[p, j])] for s in subsets])
      np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6)


def test_expected_best_of_n_equals_the_average_over_all_subsets():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(3, 7))
  values = rng.normal(size=(3, 7))
  for n in (1, 2, 3, 7):
    got = best_of_n.expected_best_of_n(jnp.asarray(scores), jnp.asarray(values), n)
    for p in range(3):
      subsets = list(itertools.combinations(range(7), n))
      want = np.mean([values[p, max(s, key=lambda j: scores[p, j])] for s in subsets])
      np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6)
  # n = 1 is the plain mean; n = N is the top-scored sample.
  np.testing.assert_allclose(
    best_of_n.expected_best_of_n(scores, values, 1), values.mean(-1), rtol=1e-5
  )
  np.testing.assert_allclose(
    best_of_n.expected_best_of_n(scores, values, 7),
    values[np.arange(3), scores.argmax(-1)],
    rtol=1e-5,
  )
