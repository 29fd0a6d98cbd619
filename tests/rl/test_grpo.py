"""Group baselines (GRPO, Dr. GRPO, RLOO), the KL loss term and KL-shaped rewards, by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import grpo

NAN = float("nan")
REWARDS = jnp.array([1.0, 2.0, 3.0, 6.0])


def test_grpo_advantages_hand_worked_groups_of_two():
  # Groups [1, 2] and [3, 6]: means 1.5 and 4.5, deviations +-0.5 and +-1.5, unbiased
  # stds sqrt(2 * 0.25) = 0.7071068 and sqrt(2 * 2.25) = 2.1213203.
  expected = [
    -0.5 / (0.7071068 + 1e-4),
    0.5 / (0.7071068 + 1e-4),
    -1.5 / (2.1213203 + 1e-4),
    1.5 / (2.1213203 + 1e-4),
  ]
  np.testing.assert_allclose(grpo.group_advantages(REWARDS, 2, "grpo"), expected, rtol=1e-5)


def test_grpo_advantages_hand_worked_one_group_of_four():
  # Mean 3, deviations [-2, -1, 0, 3], unbiased var (4 + 1 + 0 + 9) / 3 = 14 / 3.
  std = math.sqrt(14.0 / 3.0)  # 2.1602469
  expected = np.array([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
  np.testing.assert_allclose(grpo.group_advantages(REWARDS, 4, "grpo"), expected, rtol=1e-5)


def test_dr_grpo_does_not_divide_by_the_std():
  np.testing.assert_allclose(
    grpo.group_advantages(REWARDS, 4, "grpo", scale=False), [-2.0, -1.0, 0.0, 3.0], atol=1e-6
  )
  np.testing.assert_allclose(
    grpo.group_advantages(REWARDS, 2, "grpo", scale=False), [-0.5, 0.5, -1.5, 1.5], atol=1e-6
  )


def test_rloo_hand_worked():
  # G=2: the baseline of each sample is the other one.
  np.testing.assert_allclose(
    grpo.group_advantages(REWARDS, 2, "rloo"), [-1.0, 1.0, -3.0, 3.0], atol=1e-6
  )
  # G=4: baselines (12 - r_i) / 3 = [11/3, 10/3, 3, 2].
  np.testing.assert_allclose(
    grpo.group_advantages(REWARDS, 4, "rloo"), [-8 / 3, -4 / 3, 0.0, 4.0], rtol=1e-6
  )


def test_rloo_baseline_excludes_the_sample_itself():
  rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
  for g in (2, 3, 4, 6):
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards), g, "rloo"))
    for i, r in enumerate(rewards):
      start = (i // g) * g
      others = [rewards[j] for j in range(start, start + g) if j != i]
      assert got[i] == pytest.approx(r - np.mean(others), abs=1e-5)
    # Equivalently G / (G - 1) times the deviation from the group mean (self included).
    groups = rewards.reshape(-1, g)
    scaled = g / (g - 1) * (groups - groups.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(got, scaled.reshape(-1), atol=1e-5)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_groups_are_consecutive_blocks(kind):
  # Shifting one group's rewards by a constant leaves every advantage unchanged.
  shifted = REWARDS + jnp.array([0.0, 0.0, 100.0, 100.0])
  np.testing.assert_allclose(
    grpo.group_advantages(shifted, 2, kind), grpo.group_advantages(REWARDS, 2, kind), atol=1e-4
  )


@pytest.mark.parametrize(("kind", "scale"), [("grpo", True), ("grpo", False), ("rloo", True)])
def test_identical_rewards_give_zero_advantages_not_nan(kind, scale):
  rewards = jnp.array([0.7, 0.7, 0.7, -2.0, -2.0, -2.0])
  adv = grpo.group_advantages(rewards, 3, kind, scale=scale)
  assert np.all(np.isfinite(adv))
  np.testing.assert_allclose(adv, np.zeros(6), atol=1e-5)


def test_advantages_sum_to_zero_per_group_and_jit():
  rewards = jnp.asarray(np.random.default_rng(1).normal(size=16), jnp.float32)
  for kind in ("grpo", "rloo"):
    adv = jax.jit(grpo.group_advantages, static_argnums=(1, 2))(rewards, 4, kind)
    np.testing.assert_allclose(adv.reshape(4, 4).sum(axis=1), np.zeros(4), atol=1e-5)


def test_bad_group_shapes_and_kind_raise():
  with pytest.raises(ValueError, match="B % G"):
    grpo.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match="group_size"):
    grpo.group_advantages(jnp.zeros(4), 1)
  with pytest.raises(ValueError, match=r"\[B\]"):
    grpo.group_advantages(jnp.zeros((2, 2)), 2)
  with pytest.raises(ValueError, match="ppo"):
    grpo.group_advantages(jnp.zeros(4), 2, "ppo")
  with pytest.raises(ValueError, match="B % G"):
    grpo.group_reward_stats(jnp.zeros(5), 2)


def test_group_reward_stats_hand_worked():
  # Groups [1, 1] (std 0) and [3, 6] (std 2.1213203): mean std 1.0606602, half are flat.
  stats = grpo.group_reward_stats(jnp.array([1.0, 1.0, 3.0, 6.0]), 2)
  assert float(stats["reward_std"]) == pytest.approx(1.0606602, rel=1e-5)
  assert float(stats["frac_reward_zero_std"]) == 0.5


def test_token_advantages_broadcast_over_response_only():
  mask = jnp.array([[True, True, False], [True, False, False]])
  out = grpo.token_advantages(jnp.array([2.0, -1.0]), mask)
  np.testing.assert_array_equal(out, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


# ------------------------------------------------------------------ KL loss term


def test_kl_loss_is_zero_when_policy_equals_reference():
  logp = jnp.log(jnp.array([[0.2, 0.5, 0.9], [0.3, 0.1, 0.6]]))
  mask = jnp.array([[True, True, True], [True, True, False]])
  for estimator in ("k1", "k2", "k3"):
    for mode in ("token_mean", "sequence_mean", "token_sum_norm"):
      loss = grpo.kl_loss(
        logp, logp, mask, estimator=estimator, mode=mode, as_loss=estimator != "k1"
      )
      assert float(loss) == 0.0, (estimator, mode)
  # ... and its gradient vanishes there too: the reference is a minimum of k3.
  grad = jax.grad(lambda x: grpo.kl_loss(x, logp, mask))(logp)
  np.testing.assert_allclose(grad, np.zeros((2, 3)), atol=1e-7)


def test_kl_loss_hand_worked_aggregations_and_masking():
  # Row 0: logr = +0.5, -0.5 -> k3 = e^-0.5 - 0.5 = 0.1065307, e^0.5 - 1.5 = 0.1487213.
  # Row 1: logr = +0.5, then padding holding NaN / inf that must not count.
  logp = jnp.array([[-1.0, -2.0, 0.0], [-1.0, NAN, -jnp.inf]])
  ref = jnp.array([[-1.5, -1.5, 0.0], [-1.5, 0.0, 0.0]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  a, b = 0.1065307, 0.1487213
  expected = {
    "token_mean": (a + b + a) / 3,
    "sequence_mean": ((a + b) / 2 + a) / 2,
    "token_sum_norm": (a + b + a) / 6,  # a constant B * T normaliser
  }
  for mode, value in expected.items():
    got = float(grpo.kl_loss(logp, ref, mask, mode=mode))
    assert got == pytest.approx(value, rel=1e-5), mode
  # k1 as the estimator, logged only: (0.5 - 0.5 + 0.5) / 3.
  got = float(grpo.kl_loss(logp, ref, mask, estimator="k1", as_loss=False))
  assert got == pytest.approx(0.5 / 3, rel=1e-5)
  grad = jax.grad(lambda x: grpo.kl_loss(x, ref, mask))(logp)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[:, 2], [0.0, 0.0])
  assert float(grad[1, 1]) == 0.0


def test_kl_loss_has_no_gradient_through_the_reference():
  logp = jnp.array([[-1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.5]])
  mask = jnp.ones((1, 2), bool)
  grad_ref = jax.grad(lambda r: grpo.kl_loss(logp, r, mask))(ref)
  np.testing.assert_array_equal(grad_ref, np.zeros((1, 2)))


def test_kl_loss_refuses_k1_as_a_loss():
  logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.5]])
  mask = jnp.ones((1, 2), bool)
  with pytest.raises(ValueError, match=r"'k1' cannot be a loss term.*k3") as info:
    grpo.kl_loss(logp, ref, mask, estimator="k1")
  assert str(info.value) == grpo.K1_LOSS_ERROR
  with pytest.raises(ValueError, match="'k1' cannot be a loss term"):
    jax.jit(lambda x: grpo.kl_loss(x, ref, mask, estimator="k1"))(logp)
  # Logged only (the KL in the reward), k1 is a fine estimate of the value.
  assert float(grpo.kl_loss(logp, ref, mask, estimator="k1", as_loss=False)) == 0.0


def test_kl_loss_expected_gradients_on_a_categorical():
  """Exact E_pi of each estimator's gradient on one 4-way choice, the sampling held fixed.

  k1 -> 0, k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi) (module docstring).
  """
  logits = jnp.array([0.3, -1.2, 2.0, 0.5])
  ref_logp = jax.nn.log_softmax(jnp.array([1.0, 0.0, -0.5, 0.7]))
  pi = jax.nn.softmax(logits)
  mask = jnp.ones((1, 1), bool)

  def expected_grad(estimator):
    def one(y):  # gradient of the loss on the single sample y, a [1, 1] batch
      def loss(theta):
        logp = jax.nn.log_softmax(theta)[y].reshape(1, 1)
        ref = ref_logp[y].reshape(1, 1)
        return grpo.kl_loss(logp, ref, mask, estimator=estimator, as_loss=estimator != "k1")

      return jax.grad(loss)(logits)

    return jnp.sum(pi[:, None] * jax.vmap(one)(jnp.arange(4)), axis=0)

  def reverse_kl(theta):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

  def forward_kl(theta):
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(theta)))

  np.testing.assert_allclose(expected_grad("k1"), np.zeros(4), atol=1e-6)
  np.testing.assert_allclose(expected_grad("k2"), jax.grad(reverse_kl)(logits), atol=1e-6)
  np.testing.assert_allclose(expected_grad("k3"), jax.grad(forward_kl)(logits), atol=1e-6)
  # For softmax logits the forward KL's gradient is pi - ref: k3 is not k2 away from pi = ref.
  np.testing.assert_allclose(expected_grad("k3"), pi - jnp.exp(ref_logp), atol=1e-6)
  assert float(jnp.max(jnp.abs(expected_grad("k3") - expected_grad("k2")))) > 0.05


def test_kl_shaped_rewards_hand_worked():
  # Row 0: k1 sum = 0.5 - 0.5 = 0; row 1: 0.25 + 0.25 (the pad's huge logr ignored).
  logp = jnp.array([[-1.0, -2.0, 0.0], [-1.0, -1.0, 50.0]])
  ref = jnp.array([[-1.5, -1.5, 0.0], [-1.25, -1.25, 0.0]])
  mask = jnp.array([[True, True, False], [True, True, False]])
  rewards, seq_kl = grpo.kl_shaped_rewards(jnp.array([1.0, 2.0]), logp, ref, mask, 0.1)
  np.testing.assert_allclose(seq_kl, [0.0, 0.5], atol=1e-6)
  np.testing.assert_allclose(rewards, [1.0, 2.0 - 0.05], atol=1e-6)
