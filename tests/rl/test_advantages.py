"""Reward assembly, GAE, whitening and explained variance against hand-worked examples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import advantages as adv

NAN = float("nan")


def _prefix_mask(lengths, t):
  return jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]


# Reward assembly.


def test_assemble_rewards_hand_worked():
  scores = jnp.array([2.0, 3.0, 5.0])
  kl = jnp.array([[0.1, 0.2, -0.1, 7.0], [0.3, 0.0, 0.1, 0.2], [NAN, NAN, NAN, NAN]])
  mask = _prefix_mask([3, 4, 0], 4)  # finished at index 2; truncated; empty row
  rewards, non_score, used = adv.assemble_rewards(scores, kl, mask, 0.5)
  # r_t = -0.5 * kl_t; the score joins at index length - 1.
  expected = [[-0.05, -0.1, 0.05 + 2.0, 0.0], [-0.15, 0.0, -0.05, -0.1 + 3.0], [0.0] * 4]
  np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(non_score, [-0.1, -0.3, 0.0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(used, [2.0, 3.0, 5.0])


def test_missing_eos_penalty_replaces_the_score():
  scores = jnp.array([2.0, 3.0, 5.0])
  kl = jnp.array([[0.1, 0.2, -0.1, 7.0], [0.3, 0.0, 0.1, 0.2], [0.0] * 4])
  mask = _prefix_mask([3, 4, 0], 4)
  has_eos = jnp.array([True, False, False])
  rewards, non_score, used = adv.assemble_rewards(
    scores, kl, mask, 0.5, has_eos=has_eos, missing_eos_score=-1.0
  )
  # Row 1 never emitted EOS: its last token gets -1 instead of the RM's 3.
  np.testing.assert_allclose(rewards[1], [-0.15, 0.0, -0.05, -0.1 - 1.0], rtol=1e-6)
  np.testing.assert_allclose(rewards[0, 2], 0.05 + 2.0, rtol=1e-6)
  np.testing.assert_allclose(rewards[2], [0.0] * 4)  # empty: the penalty lands nowhere
  np.testing.assert_allclose(used, [2.0, -1.0, -1.0])
  np.testing.assert_allclose(non_score, [-0.1, -0.3, 0.0], rtol=1e-6, atol=1e-7)
  # None switches the penalty off.
  np.testing.assert_allclose(
    adv.penalize_missing_eos(scores, has_eos, None), [2.0, 3.0, 5.0], rtol=1e-6
  )
  with pytest.raises(ValueError, match="has_eos"):
    adv.assemble_rewards(scores, kl, mask, 0.5, missing_eos_score=-1.0)


@pytest.mark.parametrize("lengths", [[1, 3, 6], [6, 2, 5]])
def test_score_lands_exactly_on_the_last_response_token(lengths):
  """The classic off-by-one: not a token late, not a token early, never on a pad."""
  t = 6
  mask = _prefix_mask(lengths, t)
  scores = jnp.array([10.0, 20.0, 30.0])
  rewards, _, _ = adv.assemble_rewards(scores, jnp.zeros((3, t)), mask, 0.1)
  rewards = np.asarray(rewards)
  for row, length in enumerate(lengths):
    expected = np.zeros(t)
    expected[length - 1] = scores[row]  # the EOS position of a finished response
    np.testing.assert_array_equal(rewards[row], expected)
  assert np.all(rewards[~np.asarray(mask)] == 0.0)


# GAE.

# One row of length 3 (T = 4, a NaN pad), hand-worked below.
GAE_REWARDS = jnp.array([[0.1, -0.2, 1.0, NAN]])
GAE_VALUES = jnp.array([[0.5, 0.4, 0.3, NAN]])
GAE_MASK = jnp.array([[True, True, True, False]])


def test_gae_hand_worked_gamma_1_lambda_095():
  advantages, returns = adv.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=0.95)
  # deltas: t2 = 1.0 + 0 - 0.3 = 0.7 (no value after the last token);
  #         t1 = -0.2 + 0.3 - 0.4 = -0.3; t0 = 0.1 + 0.4 - 0.5 = 0.0.
  # A2 = 0.7; A1 = -0.3 + 0.95 * 0.7 = 0.365; A0 = 0 + 0.95 * 0.365 = 0.34675.
  np.testing.assert_allclose(advantages, [[0.34675, 0.365, 0.7, 0.0]], rtol=1e-5)
  np.testing.assert_allclose(returns, [[0.84675, 0.765, 1.0, 0.0]], rtol=1e-5)


def test_gae_hand_worked_gamma_09_lambda_1():
  advantages, returns = adv.gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=1.0)
  # deltas: t2 = 0.7; t1 = -0.2 + 0.27 - 0.4 = -0.33; t0 = 0.1 + 0.36 - 0.5 = -0.04.
  # A2 = 0.7; A1 = -0.33 + 0.63 = 0.3; A0 = -0.04 + 0.27 = 0.23.
  np.testing.assert_allclose(advantages, [[0.23, 0.3, 0.7, 0.0]], rtol=1e-5, atol=1e-6)
  # With lambda = 1 returns are discounted reward sums: 0.1 - 0.18 + 0.81 = 0.73.
  np.testing.assert_allclose(returns, [[0.73, 0.7, 1.0, 0.0]], rtol=1e-5)


def _gae_loop(rewards, values, lengths, gamma, lam):
  """Plain Python reference: each row is an episode of `length` steps."""
  out = np.zeros_like(rewards)
  for row, length in enumerate(lengths):
    next_advantage, next_value = 0.0, 0.0
    for t in reversed(range(length)):
      delta = rewards[row, t] + gamma * next_value - values[row, t]
      next_advantage = delta + gamma * lam * next_advantage
      next_value = values[row, t]
      out[row, t] = next_advantage
  return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.9)])
def test_gae_matches_python_loop_on_ragged_rows(gamma, lam):
  rng = np.random.default_rng(0)
  lengths = [7, 1, 4, 0, 5]
  t = 7
  rewards = rng.normal(size=(5, t)).astype(np.float32)
  values = rng.normal(size=(5, t)).astype(np.float32)
  mask = np.asarray(_prefix_mask(lengths, t))
  expected = _gae_loop(rewards, values, lengths, gamma, lam)
  # Garbage at pads must change nothing.
  rewards[~mask], values[~mask] = np.nan, 1e6
  advantages, returns = adv.gae(jnp.array(rewards), jnp.array(values), mask, gamma, lam)
  np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, np.where(mask, expected + values, 0.0), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(advantages)[~mask] == 0.0)


# Masked statistics.


def test_whiten_hand_worked_biased_variance():
  x = jnp.array([[1.0, 2.0, 3.0, NAN]])
  mask = jnp.array([[True, True, True, False]])
  # mean 2, biased var 2/3, std 0.8164966 (the unbiased var of 1 would give -1, 0, 1).
  z = 1.0 / np.sqrt(2.0 / 3.0 + 1e-8)
  np.testing.assert_allclose(adv.whiten(x, mask), [[-z, 0.0, z, 0.0]], rtol=1e-5, atol=1e-6)
  kept = adv.whiten(x, mask, shift_mean=False)
  np.testing.assert_allclose(kept, [[2.0 - z, 2.0, 2.0 + z, 0.0]], rtol=1e-5)


def test_whiten_matches_numpy_over_masked_elements():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
  mask = np.asarray(_prefix_mask([6, 2, 0, 4], 6))
  picked = x[mask].astype(np.float64)
  expected = (picked - picked.mean()) / np.sqrt(picked.var(ddof=0) + 1e-8)
  x[~mask] = np.nan
  out = np.asarray(adv.whiten(jnp.array(x), mask))
  np.testing.assert_allclose(out[mask], expected, rtol=1e-4, atol=1e-5)
  assert np.all(out[~mask] == 0.0)
  kept = np.asarray(adv.whiten(jnp.array(x), mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask], expected + picked.mean(), rtol=1e-4, atol=1e-5)
  assert kept[mask].mean() == pytest.approx(picked.mean(), rel=1e-4)
  np.testing.assert_allclose(adv.masked_mean(x, mask), picked.mean(), rtol=1e-5)
  np.testing.assert_allclose(adv.masked_var(x, mask), picked.var(ddof=0), rtol=1e-4)


def test_empty_mask_gives_zeros_not_nan():
  x = jnp.full((2, 3), NAN)
  empty = jnp.zeros((2, 3), bool)
  assert float(adv.masked_mean(x, empty)) == 0.0
  assert float(adv.masked_var(x, empty)) == 0.0
  np.testing.assert_array_equal(adv.whiten(x, empty), np.zeros((2, 3)))
  assert float(adv.explained_variance(x, x, empty)) == 0.0
  advantages, returns = adv.gae(x, x, empty)
  np.testing.assert_array_equal(advantages, np.zeros((2, 3)))
  np.testing.assert_array_equal(returns, np.zeros((2, 3)))


def test_explained_variance_hand_worked():
  pred = jnp.array([[1.0, 2.0, NAN], [3.0, NAN, NAN]])
  target = jnp.array([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  # error [0, 0, 1]: var 2/9; target [1, 2, 4]: var 14/9; 1 - 1/7 = 6/7.
  np.testing.assert_allclose(adv.explained_variance(pred, target, mask), 6.0 / 7.0, rtol=1e-5)
  assert float(adv.explained_variance(target, target, mask)) == pytest.approx(1.0)
  # Predicting the mean explains nothing; a constant target is defined as 0.
  mean = jnp.full_like(target, 7.0 / 3.0)
  assert float(adv.explained_variance(mean, target, mask)) == pytest.approx(0.0, abs=1e-5)
  assert float(adv.explained_variance(pred, jnp.ones_like(target), mask)) == 0.0


def test_every_function_jits():
  rng = np.random.default_rng(2)
  mask = _prefix_mask([4, 2, 0], 4)
  x, y = (jnp.array(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))
  scores, has_eos = jnp.array([1.0, 2.0, 3.0]), jnp.array([True, False, False])
  cases = [
    (adv.masked_mean, (x, mask)),
    (adv.masked_var, (x, mask)),
    (functools.partial(adv.whiten, shift_mean=False), (x, mask)),
    (adv.explained_variance, (x, y, mask)),
    (functools.partial(adv.penalize_missing_eos, missing_eos_score=-1.0), (scores, has_eos)),
    (adv.last_token_one_hot, (mask,)),
    (
      functools.partial(adv.assemble_rewards, has_eos=has_eos, missing_eos_score=-1.0),
      (scores, x, mask, jnp.float32(0.1)),
    ),
    (adv.gae, (x, y, mask, 0.9, 0.95)),
  ]
  for fn, args in cases:
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      jax.jit(fn)(*args),
      fn(*args),
    )
