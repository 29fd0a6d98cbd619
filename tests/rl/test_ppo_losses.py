"""PPO policy loss, value loss, entropy and loss aggregation against hand-worked examples."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import ppo_losses

NAN = float("nan")
MODES = ("token_mean", "sequence_mean", "token_sum_norm")


# Aggregation.


def test_aggregation_modes_differ_on_ragged_masks():
  values = jnp.array([[1.0, 1.0, 1.0, 1.0], [3.0, NAN, NAN, NAN], [NAN] * 4])
  mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  # Tokens: (4 + 3) / 5. Sequences: mean(1, 3) over the two non-empty rows.
  # Constant normaliser: 7 / (B * T) = 7 / 12.
  assert float(ppo_losses.aggregate(values, mask, "token_mean")) == pytest.approx(1.4)
  assert float(ppo_losses.aggregate(values, mask, "sequence_mean")) == pytest.approx(2.0)
  assert float(ppo_losses.aggregate(values, mask, "token_sum_norm")) == pytest.approx(7 / 12)


def test_aggregation_modes_agree_on_full_masks():
  values = jnp.array([[1.0, 2.0], [3.0, 6.0]])
  mask = jnp.ones((2, 2), bool)
  results = [float(ppo_losses.aggregate(values, mask, mode)) for mode in MODES]
  np.testing.assert_allclose(results, [3.0, 3.0, 3.0], rtol=1e-6)


def test_aggregation_of_an_empty_mask_is_zero():
  values = jnp.full((2, 3), NAN)
  for mode in MODES:
    assert float(ppo_losses.aggregate(values, jnp.zeros((2, 3), bool), mode)) == 0.0
  with pytest.raises(ValueError, match="seq_sum"):
    ppo_losses.aggregate(values, jnp.zeros((2, 3), bool), "seq_sum")


# Policy loss.

# (ratio, advantage) per token; row 0 has 4 response tokens, row 1 has 2.
#   ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2  clipped
#   ratio 0.9, A = +1: max(-0.9, -0.9) = -0.9  inside the range
#   ratio 0.5, A = -1: max( 0.5,  0.8) =  0.8  clipped
#   ratio 1.1, A = -1: max( 1.1,  1.1) =  1.1  inside the range
#   ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5  not clipped (pessimistic bound)
#   ratio 1.5, A = -1: max( 1.5,  1.2) =  1.5  not clipped (pessimistic bound)
RATIOS = [[1.5, 0.9, 0.5, 1.1], [0.5, 1.5, 1.0, 1.0]]
ADVANTAGES = jnp.array([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, NAN, NAN]])
POLICY_MASK = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
OLD_LOGP = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, NAN, -jnp.inf]])
LOGP = OLD_LOGP + jnp.log(jnp.array(RATIOS))


@pytest.mark.parametrize(
  "mode, expected",
  [
    ("token_mean", 0.8 / 6),  # (-1.2 - 0.9 + 0.8 + 1.1 - 0.5 + 1.5) / 6
    ("sequence_mean", (-0.2 / 4 + 1.0 / 2) / 2),  # mean(-0.05, 0.5) = 0.225
    ("token_sum_norm", 0.8 / 8),
  ],
)
def test_policy_loss_hand_worked(mode, expected):
  loss, stats = ppo_losses.policy_loss(LOGP, OLD_LOGP, ADVANTAGES, POLICY_MASK, mode=mode)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(stats["clipfrac"]) == pytest.approx(2 / 6, rel=1e-5)
  log_ratios = [math.log(r) for r in (1.5, 0.9, 0.5, 1.1, 0.5, 1.5)]
  approxkl = 0.5 * sum(x * x for x in log_ratios) / 6
  approxkl_k3 = sum(math.exp(x) - 1 - x for x in log_ratios) / 6
  assert float(stats["approxkl"]) == pytest.approx(approxkl, rel=1e-5)  # 0.0653
  assert float(stats["approxkl_k3"]) == pytest.approx(approxkl_k3, rel=1e-5)  # 0.0674


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_with_finite_grads():
  logp = jnp.array([[-1.0, -2.0, -jnp.inf], [-0.5, NAN, NAN]])
  advantages = jnp.array([[2.0, -1.0, NAN], [4.0, NAN, NAN]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
  loss, stats = ppo_losses.policy_loss(logp, logp, advantages, mask)
  assert float(loss) == pytest.approx(-5.0 / 3)
  for name in ("clipfrac", "approxkl", "approxkl_k3"):
    assert float(stats[name]) == 0.0
  # d loss / d logp_t = -A_t / 3 at ratio 1, and exactly 0 on pads.
  grad = jax.grad(lambda x: ppo_losses.policy_loss(x, logp, advantages, mask)[0])(logp)
  np.testing.assert_allclose(grad, [[-2.0 / 3, 1.0 / 3, 0.0], [-4.0 / 3, 0.0, 0.0]], rtol=1e-5)


def test_clip_eps_is_respected():
  # With eps = 0.6 none of the six tokens is outside [0.4, 1.6]: loss = mean(-A * ratio).
  loss, stats = ppo_losses.policy_loss(LOGP, OLD_LOGP, ADVANTAGES, POLICY_MASK, clip_eps=0.6)
  assert float(loss) == pytest.approx((-1.5 - 0.9 + 0.5 + 1.1 - 0.5 + 1.5) / 6, rel=1e-5)
  assert float(stats["clipfrac"]) == 0.0


# Value loss.

# (V, V_old, R) per token, eps = 0.2; row 0 has 3 tokens, row 1 has 1.
#   V  0.5, old 0, R  1: clipped V 0.2, errors 0.25 vs 0.64 -> 0.64 clipped
#   V  1.5, old 1, R  1: clipped V 1.2, errors 0.25 vs 0.04 -> 0.25
#   V  0.1, old 0, R  1: inside the range, 0.81 both           -> 0.81
#   V -0.5, old 0, R -1: clipped V -0.2, errors 0.25 vs 0.64  -> 0.64 clipped
VALUES = jnp.array([[0.5, 1.5, 0.1], [-0.5, NAN, NAN]])
OLD_VALUES = jnp.array([[0.0, 1.0, 0.0], [0.0, NAN, 5.0]])
RETURNS = jnp.array([[1.0, 1.0, 1.0], [-1.0, 9.0, NAN]])
VALUE_MASK = jnp.array([[1, 1, 1], [1, 0, 0]], bool)


@pytest.mark.parametrize(
  "mode, expected",
  [
    ("token_mean", 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4),  # 0.2925
    ("sequence_mean", 0.5 * ((0.64 + 0.25 + 0.81) / 3 + 0.64) / 2),
    ("token_sum_norm", 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 6),
  ],
)
def test_value_loss_hand_worked(mode, expected):
  loss, stats = ppo_losses.value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, mode=mode)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(stats["clipfrac"]) == pytest.approx(0.5)
  assert float(stats["vpred"]) == pytest.approx((0.5 + 1.5 + 0.1 - 0.5) / 4, rel=1e-5)
  assert float(stats["error"]) == pytest.approx((0.25 + 0.25 + 0.81 + 0.25) / 4, rel=1e-5)


def test_value_loss_grads_are_finite_and_zero_when_clipped():
  grad = jax.grad(lambda v: ppo_losses.value_loss(v, OLD_VALUES, RETURNS, VALUE_MASK)[0])(VALUES)
  # Clipped tokens (0 and 3) have no gradient; the others get (V - R) / 4.
  np.testing.assert_allclose(grad, [[0.0, 0.5 / 4, -0.9 / 4], [0.0, 0.0, 0.0]], atol=1e-6)


# Entropy.


def test_masked_entropy_hand_worked():
  neg = -1e9
  logits = jnp.array(
    [
      [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, neg, neg]],  # log 4, log 2
      [[0.0, math.log(3.0), neg, neg], [NAN] * 4],  # p = (1/4, 3/4); a NaN pad
    ]
  )
  mask = jnp.array([[True, True], [True, False]])
  h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
  token_mean = ppo_losses.masked_entropy(logits, mask)
  assert float(token_mean) == pytest.approx((math.log(4) + math.log(2) + h) / 3, rel=1e-5)
  sequence_mean = ppo_losses.masked_entropy(logits, mask, mode="sequence_mean")
  assert float(sequence_mean) == pytest.approx(((math.log(4) + math.log(2)) / 2 + h) / 2, rel=1e-5)
  # Temperature 2 on doubled logits is the same distribution.
  hot = ppo_losses.masked_entropy(2 * logits, mask, temperature=2.0)
  assert float(hot) == pytest.approx(float(token_mean), rel=1e-5)
  grad = jax.grad(lambda x: ppo_losses.masked_entropy(x, mask))(logits)
  assert np.all(np.isfinite(grad)) and np.all(grad[1, 1] == 0.0)


# Jit.


def test_every_loss_jits():
  logits = jnp.array(np.random.default_rng(0).normal(size=(2, 4, 5)), jnp.float32)
  for mode in MODES:
    cases = [
      (functools.partial(ppo_losses.aggregate, mode=mode), (ADVANTAGES, POLICY_MASK)),
      (
        functools.partial(ppo_losses.policy_loss, mode=mode),
        (LOGP, OLD_LOGP, ADVANTAGES, POLICY_MASK),
      ),
      (
        functools.partial(ppo_losses.value_loss, mode=mode),
        (VALUES, OLD_VALUES, RETURNS, VALUE_MASK),
      ),
      (functools.partial(ppo_losses.masked_entropy, mode=mode), (logits, POLICY_MASK)),
    ]
    for fn, args in cases:
      jitted, eager = jax.jit(fn)(*args), fn(*args)
      for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
