"""Reward-model math against hand-worked examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import reward


def test_last_token_scores_reads_the_eos_position():
  values = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(reward.last_token_scores(values, mask), [3.0, 8.0])
  # An empty row reads position 0 rather than wrapping to -1.
  np.testing.assert_array_equal(reward.last_token_scores(values, jnp.zeros_like(mask)), [1.0, 5.0])


def test_bradley_terry_hand_worked():
  chosen, rejected = jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0])
  loss, terms = reward.bradley_terry_loss(chosen, rejected)
  # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(0) = log 2.
  expected = [math.log1p(math.exp(-1.0)), math.log(2.0)]
  np.testing.assert_allclose(terms["nll"], expected, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-6)

  # A margin of 1 turns the first pair's gap of 1 into 0: log 2.
  _, terms = reward.bradley_terry_loss(chosen, rejected, margin=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(terms["nll"][0], math.log(2.0), rtol=1e-6)

  # A tie is a soft 0.5 label: at d=1, -(0.5 log s(1) + 0.5 log s(-1)).
  _, terms = reward.bradley_terry_loss(chosen, rejected, tie=jnp.array([True, False]))
  soft = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)))
  np.testing.assert_allclose(terms["nll"][0], soft, rtol=1e-6)

  # Weights give a weighted mean; centering (unit weights) adds 0.01 * (3^2 + 0^2) / 2.
  loss, _ = reward.bradley_terry_loss(chosen, rejected, weight=jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
  loss, _ = reward.bradley_terry_loss(chosen, rejected, center_coef=0.01)
  np.testing.assert_allclose(loss, np.mean(expected) + 0.01 * 4.5, rtol=1e-6)


def test_centering_is_weighted_like_the_nll():
  chosen, rejected = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, -0.5, 0.25])
  w = jnp.array([1.0, 2.0, 0.5])

  def loss(c, r, weight):
    return reward.bradley_terry_loss(c, r, weight=weight, center_coef=0.1)[0]

  # A weight-0 padding pair with huge scores changes neither the loss nor the others' gradients.
  pad_c, pad_r = jnp.append(chosen, 1e4), jnp.append(rejected, 3e3)
  pad_w = jnp.append(w, 0.0)
  np.testing.assert_allclose(loss(pad_c, pad_r, pad_w), loss(chosen, rejected, w), rtol=1e-6)
  grads = jax.grad(loss, argnums=(0, 1))(chosen, rejected, w)
  pad_grads = jax.grad(loss, argnums=(0, 1))(pad_c, pad_r, pad_w)
  for g, pad_g in zip(grads, pad_grads, strict=True):
    np.testing.assert_allclose(pad_g[:3], g, rtol=1e-6)
    assert float(pad_g[3]) == 0.0

  # The centering term is the weighted mean: (1 * 9 + 2 * 0 + 0.5 * 0.5625) / 3.5.
  _, terms = reward.bradley_terry_loss(chosen, rejected)
  nll = float(jnp.sum(w * terms["nll"]) / 3.5)
  np.testing.assert_allclose(loss(chosen, rejected, w), nll + 0.1 * (9 + 0.28125) / 3.5, rtol=1e-6)

  # With unit weights it is the unweighted mean it always was.
  rng = np.random.default_rng(0)
  c, r = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  want = np.mean(np.log1p(np.exp(-(c - r)))) + 0.1 * np.mean((c + r) ** 2)
  for weight in (None, jnp.ones(16)):
    got, _ = reward.bradley_terry_loss(
      jnp.asarray(c), jnp.asarray(r), weight=weight, center_coef=0.1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_tie_loss_is_minimised_at_equal_scores():
  diffs = jnp.linspace(-2, 2, 41)
  _, terms = reward.bradley_terry_loss(diffs, jnp.zeros_like(diffs), tie=jnp.ones(41, bool))
  assert int(jnp.argmin(terms["nll"])) == 20


def test_soft_target_hand_worked_and_minimised_at_its_probability():
  chosen, rejected = jnp.array([1.0, 1.0, 1.0]), jnp.zeros(3)
  target = jnp.array([0.75, 1.0, 0.75])
  tie = jnp.array([False, False, True])
  _, terms = reward.bradley_terry_loss(chosen, rejected, target=target, tie=tie)
  # -(0.75 log s(1) + 0.25 log s(-1)); target 1 is the hard label; a tie ignores its target.
  soft = 0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.exp(1.0))
  hard = math.log1p(math.exp(-1.0))
  tie_nll = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)))
  np.testing.assert_allclose(terms["nll"], [soft, hard, tie_nll], rtol=1e-6)
  # The soft loss is minimised where sigmoid(d) = t: d = logit(0.75) = log 3.
  diffs = jnp.linspace(0.0, 2.2, 221)
  _, terms = reward.bradley_terry_loss(diffs, jnp.zeros_like(diffs), target=jnp.full(221, 0.75))
  assert float(diffs[jnp.argmin(terms["nll"])]) == pytest.approx(math.log(3.0), abs=0.01)
  # With a margin m the minimum moves to d = m + log 3.
  _, terms = reward.bradley_terry_loss(
    diffs, jnp.zeros_like(diffs), target=jnp.full(221, 0.75), margin=jnp.full(221, 0.5)
  )
  assert float(diffs[jnp.argmin(terms["nll"])]) == pytest.approx(0.5 + math.log(3.0), abs=0.01)


def test_confidence_targets():
  t = reward.confidence_targets(np.array([1.0, 2.0, 3.0, 5.0, 7.0, 0.0, np.nan]), 1.0, 5.0)
  np.testing.assert_allclose(t, [0.5, 0.625, 0.75, 1.0, 1.0, 0.5, 1.0])
  assert reward.confidence_targets(np.array([np.nan]), 0, 1, missing=0.5)[0] == 0.5
  with pytest.raises(ValueError, match="high must exceed low"):
    reward.confidence_targets(np.array([1.0]), 5.0, 1.0)


def test_accuracy_ece_and_correlations():
  assert reward.preference_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
  assert reward.preference_accuracy(np.array([1.0, -1.0]), np.array([False, True])) == 1.0
  # All pairs at p = sigmoid(d) = 0.8 with 80% right: perfectly calibrated.
  d = math.log(4.0)  # sigmoid = 0.8
  diff = np.array([d] * 8 + [-d] * 2)
  assert reward.expected_calibration_error(diff) == pytest.approx(0.0, abs=1e-9)
  # Hand-worked: p=0.8 for all, only half right: ECE = |0.5 - 0.8| = 0.3.
  diff = np.array([d] * 5 + [-d] * 5)
  assert reward.expected_calibration_error(diff) == pytest.approx(0.3, abs=1e-9)
  x = np.array([1.0, 2.0, 3.0, 4.0])
  assert reward.pearson(x, 2 * x + 1) == pytest.approx(1.0)
  assert reward.spearman(x, x**3) == pytest.approx(1.0)
  assert reward.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
  # Spearman with ties uses average ranks: ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3].
  assert reward.spearman(np.array([1.0, 2, 2, 3]), x) == pytest.approx(
    np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
  )


def test_normalization_gives_mean_zero_std_one():
  scores = np.array([1.0, 3.0, 5.0, 7.0])
  gain, bias = reward.normalization(scores)
  out = gain * scores + bias
  assert out.mean() == pytest.approx(0.0, abs=1e-12)
  assert out.std() == pytest.approx(1.0)
