"""DPO losses, metrics and sequence log-probs against hand-worked examples."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import dpo

NAN = float("nan")
BETA = 0.5

# Two pairs, log-probs summed over response tokens:
#   pair 0: log pi(y_w) - log ref(y_w) = -10 - (-11) = +1,
#           log pi(y_l) - log ref(y_l) = -12 - (-11) = -1,  h = 2, beta h = 1
#   pair 1: chosen ratio -5 - (-5) = 0, rejected ratio -4 - (-5) = +1, h = -1, beta h = -0.5
POLICY_CHOSEN = jnp.array([-10.0, -5.0])
POLICY_REJECTED = jnp.array([-12.0, -4.0])
REF_CHOSEN = jnp.array([-11.0, -5.0])
REF_REJECTED = jnp.array([-11.0, -5.0])
CHOSEN_LENGTHS = jnp.array([4.0, 2.0])
REJECTED_LENGTHS = jnp.array([2.0, 5.0])


def softplus(x):
  return math.log1p(math.exp(x))  # -log sigmoid(-x)


def loss(loss_type, **kwargs):
  kwargs.setdefault("chosen_lengths", CHOSEN_LENGTHS)
  kwargs.setdefault("rejected_lengths", REJECTED_LENGTHS)
  out, metrics = dpo.dpo_loss(
    POLICY_CHOSEN,
    POLICY_REJECTED,
    REF_CHOSEN,
    REF_REJECTED,
    beta=kwargs.pop("beta", BETA),
    loss_type=loss_type,
    **kwargs,
  )
  return np.asarray(out), {k: np.asarray(v) for k, v in metrics.items()}


# Losses.


def test_sigmoid_loss():
  # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-0.5) = log(1 + e^0.5).
  got, _ = loss("sigmoid")
  np.testing.assert_allclose(got, [0.3132617, 0.9740770], rtol=1e-6)
  np.testing.assert_allclose(got, [softplus(-1.0), softplus(0.5)], rtol=1e-6)


def test_hinge_loss():
  # max(0, 1 - 1) = 0; max(0, 1 + 0.5) = 1.5.
  got, _ = loss("hinge")
  np.testing.assert_allclose(got, [0.0, 1.5], atol=1e-7)


def test_ipo_uses_length_averaged_log_ratios():
  # Target 1 / (2 beta) = 1.
  # pair 0: h_mean = 1/4 - (-1/2) = 0.75 -> (0.75 - 1)^2 = 0.0625
  # pair 1: h_mean = 0/2 - 1/5 = -0.2   -> (-1.2)^2     = 1.44
  # (with summed log-ratios pair 0 would give (2 - 1)^2 = 1).
  got, _ = loss("ipo")
  np.testing.assert_allclose(got, [0.0625, 1.44], rtol=1e-6)
  # Doubling every length halves h_mean: (0.375 - 1)^2, (-0.1 - 1)^2.
  got, _ = loss("ipo", chosen_lengths=2 * CHOSEN_LENGTHS, rejected_lengths=2 * REJECTED_LENGTHS)
  np.testing.assert_allclose(got, [0.390625, 1.21], rtol=1e-6)


def test_conservative_loss():
  # eps = 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
  #            0.9 * softplus(0.5) + 0.1 * softplus(-0.5) = 0.9 * 0.9740770 + 0.1 * 0.4740770
  got, _ = loss("conservative", label_smoothing=0.1)
  np.testing.assert_allclose(got, [0.4132617, 0.9240770], rtol=1e-6)


def test_conservative_without_smoothing_is_sigmoid():
  np.testing.assert_array_equal(loss("conservative")[0], loss("sigmoid")[0])


def test_policy_equal_to_reference_gives_log_2():
  same = jnp.array([-3.0, -7.5])
  out, metrics = dpo.dpo_loss(same, same - 1, same, same - 1, beta=0.1, loss_type="sigmoid")
  np.testing.assert_allclose(out, [math.log(2)] * 2, rtol=1e-6)
  np.testing.assert_array_equal(metrics["rewards/margins"], [0.0, 0.0])


def test_ties_get_the_half_target():
  tie = jnp.array([True, False])
  sigmoid, _ = loss("sigmoid", tie=tie)
  # Tie, beta h = 1: 0.5 * softplus(-1) + 0.5 * softplus(1) = 0.5 * (0.3132617 + 1.3132617).
  np.testing.assert_allclose(sigmoid, [0.8132617, 0.9740770], rtol=1e-6)
  conservative, _ = loss("conservative", tie=tie, label_smoothing=0.1)
  np.testing.assert_allclose(conservative, [0.8132617, 0.9240770], rtol=1e-6)
  # IPO regresses a tie's h_mean onto 0: 0.75^2.
  ipo, _ = loss("ipo", tie=tie)
  np.testing.assert_allclose(ipo, [0.5625, 1.44], rtol=1e-6)
  hinge, _ = loss("hinge", tie=jnp.array([False, True]))
  np.testing.assert_allclose(hinge, [0.0, 0.0], atol=1e-7)


def test_soft_targets():
  target = jnp.array([0.75, 0.5])
  # Pair 0, beta h = 1: 0.75 softplus(-1) + 0.25 softplus(1); pair 1, target 1/2, beta h = -0.5:
  # 0.5 softplus(0.5) + 0.5 softplus(-0.5).
  sigmoid, _ = loss("sigmoid", target=target)
  np.testing.assert_allclose(sigmoid, [0.5632617, 0.7240770], rtol=1e-6)
  # cDPO smooths the target: t' = 0.9 * 0.75 + 0.1 * 0.25 = 0.7; a target of 1/2 stays 1/2.
  conservative, _ = loss("conservative", target=target, label_smoothing=0.1)
  np.testing.assert_allclose(conservative, [0.6132617, 0.7240770], rtol=1e-6)
  # IPO's target h_mean is (2t - 1) / (2 beta): 0.5 and 0. (0.75 - 0.5)^2, (-0.2)^2.
  ipo, _ = loss("ipo", target=target)
  np.testing.assert_allclose(ipo, [0.0625, 0.04], rtol=1e-6)
  # A target of 1 is the hard label; a tie overrides its target with 1/2.
  ones = jnp.ones(2)
  for loss_type in ("sigmoid", "ipo"):
    np.testing.assert_allclose(loss(loss_type, target=ones)[0], loss(loss_type)[0], rtol=1e-6)
  tie = jnp.array([True, False])
  np.testing.assert_allclose(
    loss("sigmoid", target=ones, tie=tie)[0], loss("sigmoid", tie=tie)[0], rtol=1e-6
  )
  with pytest.raises(ValueError, match="hinge"):
    loss("hinge", target=target)


@pytest.mark.parametrize("t", [0.6, 0.9])
def test_soft_target_is_matched_at_its_log_odds(t):
  # The sigmoid loss with target t is minimised where sigmoid(beta h) = t.
  beta = 0.5
  h_star = math.log(t / (1 - t)) / beta

  def f(h, t):
    out, _ = dpo.dpo_loss(
      h + jnp.zeros(1),
      jnp.zeros(1),
      jnp.zeros(1),
      jnp.zeros(1),
      beta=beta,
      loss_type="sigmoid",
      target=jnp.array([t]),
    )
    return out[0]

  grad = jax.grad(f)
  assert abs(float(grad(h_star, t))) < 1e-6
  assert float(grad(h_star - 1.0, t)) < 0 < float(grad(h_star + 1.0, t))


# Metrics.


def test_metrics():
  _, metrics = loss("sigmoid")
  np.testing.assert_allclose(metrics["rewards/chosen"], [0.5, 0.0])
  np.testing.assert_allclose(metrics["rewards/rejected"], [-0.5, 0.5])
  np.testing.assert_allclose(metrics["rewards/margins"], [1.0, -0.5])
  np.testing.assert_array_equal(metrics["rewards/accuracies"], [1.0, 0.0])
  np.testing.assert_array_equal(metrics["logps/chosen"], [-10.0, -5.0])
  np.testing.assert_array_equal(metrics["logps/rejected"], [-12.0, -4.0])
  # The metrics do not depend on the loss form.
  for loss_type in dpo.LOSS_TYPES:
    other = loss(loss_type)[1]
    for key, value in metrics.items():
      np.testing.assert_array_equal(other[key], value)


# Gradients.


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
  # At the reference (h = 0) every form has a nonzero slope pushing h up.
  chosen, rejected = jnp.array([-6.0, -9.0]), jnp.array([-7.0, -4.0])

  def total(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    out, _ = dpo.dpo_loss(
      policy_chosen,
      policy_rejected,
      ref_chosen,
      ref_rejected,
      beta=0.1,
      loss_type=loss_type,
      label_smoothing=0.1 if loss_type == "conservative" else 0.0,
      chosen_lengths=jnp.array([3.0, 4.0]),
      rejected_lengths=jnp.array([2.0, 5.0]),
    )
    return jnp.sum(out)

  grads = jax.grad(total, argnums=(0, 1, 2, 3))(chosen, rejected, chosen, rejected)
  g_chosen, g_rejected, g_ref_chosen, g_ref_rejected = map(np.asarray, grads)
  # Gradient descent moves along -grad: chosen log-probs up, rejected down.
  assert np.all(g_chosen < 0), g_chosen
  assert np.all(g_rejected > 0), g_rejected
  # The reference is frozen.
  np.testing.assert_array_equal(g_ref_chosen, 0.0)
  np.testing.assert_array_equal(g_ref_rejected, 0.0)


def test_sigmoid_gradient_value():
  # d/dc -log sigmoid(beta (c - r)) = -beta sigmoid(-beta h); at beta h = 1: -0.5 * 0.2689414.
  grads = jax.grad(
    lambda c, r: jnp.sum(
      dpo.dpo_loss(c, r, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="sigmoid")[0]
    ),
    argnums=(0, 1),
  )(POLICY_CHOSEN, POLICY_REJECTED)
  np.testing.assert_allclose(grads[0][0], -0.5 * 0.26894142, rtol=1e-6)
  np.testing.assert_allclose(grads[1][0], 0.5 * 0.26894142, rtol=1e-6)


def test_jittable():
  fn = jax.jit(functools.partial(dpo.dpo_loss, beta=BETA, loss_type="ipo"))
  got, _ = fn(
    POLICY_CHOSEN,
    POLICY_REJECTED,
    REF_CHOSEN,
    REF_REJECTED,
    chosen_lengths=CHOSEN_LENGTHS,
    rejected_lengths=REJECTED_LENGTHS,
  )
  np.testing.assert_allclose(got, [0.0625, 1.44], rtol=1e-6)


# Errors.


def test_unknown_loss_type_is_named():
  with pytest.raises(ValueError, match="'kto'"):
    loss("kto")


def test_bad_arguments():
  with pytest.raises(ValueError, match="beta"):
    loss("sigmoid", beta=0.0)
  with pytest.raises(ValueError, match="conservative"):
    loss("sigmoid", label_smoothing=0.1)
  with pytest.raises(ValueError, match="label_smoothing"):
    loss("conservative", label_smoothing=0.7)
  with pytest.raises(ValueError, match="lengths"):
    loss("ipo", chosen_lengths=None)


# Sequence log-probs.


def test_sequence_logps_sums_masked_tokens_only():
  token_logps = jnp.array([[-1.0, -2.0, NAN], [-0.5, -jnp.inf, -0.25]])
  mask = jnp.array([[1, 1, 0], [1, 0, 1]], bool)
  sums, counts = dpo.sequence_logps(token_logps, mask)
  np.testing.assert_array_equal(sums, [-3.0, -0.75])
  np.testing.assert_array_equal(counts, [2.0, 2.0])
  grad = jax.grad(lambda x: jnp.sum(dpo.sequence_logps(x, mask)[0]))(token_logps)
  np.testing.assert_array_equal(grad, mask.astype(np.float32))


def test_response_logps_reads_the_positions_before_the_response():
  # Row: BOS p r1 EOS PAD; logit t predicts token t + 1, so r1 is read at t = 1 and EOS at t = 2.
  vocab = 4
  tokens = jnp.array([[2, 3, 3, 1, 0]])  # ids: PAD 0, EOS 1, BOS 2, other 3
  loss_mask = jnp.array([[0, 0, 1, 1, 0]], bool)
  # p(r1 = 3 at t = 1) = 3 / (3 + 1 + 1 + 1) = 1/2; p(EOS at t = 2) = 1/4 (uniform).
  logits = jnp.zeros((1, 5, vocab)).at[0, 1, 3].set(math.log(3.0))
  sums, counts = dpo.response_logps(logits, tokens, loss_mask)
  np.testing.assert_allclose(sums, [math.log(0.5) + math.log(0.25)], rtol=1e-6)
  np.testing.assert_array_equal(counts, [2.0])


@pytest.mark.parametrize("zero", [0.0, np.float32(0.0), jnp.float32(0.0), np.float64(-1.0)])
def test_beta_must_be_positive_whatever_its_type(zero):
  # A NumPy or JAX zero used to pass the check, and IPO then divided by it (inf loss).
  x = jnp.zeros((2,))
  with pytest.raises(ValueError, match="beta must be > 0"):
    dpo.dpo_loss(
      x, x, x, x, beta=zero, loss_type="ipo", chosen_lengths=x + 1, rejected_lengths=x + 1
    )
