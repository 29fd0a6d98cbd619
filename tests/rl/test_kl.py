"""KL estimators, objective KL and KL controllers against hand-worked examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import kl

NAN = float("nan")


def test_estimators_hand_worked():
  # logr = logp - ref_logp = +0.5 and -0.5.
  logp = jnp.array([[-1.0, -2.0]])
  ref_logp = jnp.array([[-1.5, -1.5]])
  np.testing.assert_allclose(kl.kl_penalty(logp, ref_logp, "k1"), [[0.5, -0.5]], rtol=1e-6)
  np.testing.assert_allclose(kl.kl_penalty(logp, ref_logp, "k2"), [[0.125, 0.125]], rtol=1e-6)
  # k3 = exp(-logr) - 1 + logr: e^-0.5 - 0.5 = 0.1065307, e^0.5 - 1.5 = 0.1487213.
  # The flipped sign convention, exp(logr) - 1 - logr, would swap these two.
  np.testing.assert_allclose(
    kl.kl_penalty(logp, ref_logp, "k3"), [[0.1065307, 0.1487213]], rtol=1e-5
  )


def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference():
  # Exact expectations over every outcome, weighted by the sampling policy pi.
  pi = np.array([0.5, 0.3, 0.2])
  ref = np.array([0.2, 0.5, 0.3])
  true_kl = float(np.sum(pi * np.log(pi / ref)))  # KL(pi || ref) = 0.2332...
  logp, ref_logp = jnp.log(pi)[None], jnp.log(ref)[None]
  for kind in ("k1", "k3"):
    expectation = float(jnp.sum(pi * kl.kl_penalty(logp, ref_logp, kind)))
    assert expectation == pytest.approx(true_kl, rel=1e-5), kind
  # k3 estimates KL(pi || ref), not KL(ref || pi), which differs here.
  reverse_kl = float(np.sum(ref * np.log(ref / pi)))
  assert abs(true_kl - reverse_kl) > 1e-2
  k3 = float(jnp.sum(pi * kl.kl_penalty(logp, ref_logp, "k3")))
  assert k3 != pytest.approx(reverse_kl, rel=1e-3)


def test_mask_zeroes_pads_even_with_nan_and_inf():
  logp = jnp.array([[-1.0, -jnp.inf, NAN]])
  ref_logp = jnp.array([[-1.5, -jnp.inf, 0.0]])
  mask = jnp.array([[True, False, False]])
  for kind, first in (("k1", 0.5), ("k2", 0.125), ("k3", 0.1065307)):
    out = kl.kl_penalty(logp, ref_logp, kind, mask=mask)
    np.testing.assert_allclose(out, [[first, 0.0, 0.0]], rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(kl.kl_penalty(x, ref_logp, "k3", mask=mask)))(logp)
  assert np.all(np.isfinite(grad))


def test_unknown_estimator_raises():
  with pytest.raises(ValueError, match="k4"):
    kl.kl_penalty(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


def test_objective_kl_is_batch_mean_of_sequence_sums():
  per_token = jnp.array([[0.5, -0.2, 0.3, 9.0], [1.0, 9.0, NAN, 9.0], [NAN, NAN, NAN, NAN]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_allclose(kl.sequence_kl(per_token, mask), [0.6, 1.0, 0.0], rtol=1e-6)
  # (0.6 + 1.0 + 0) / 3 rows, the empty row included.
  np.testing.assert_allclose(kl.objective_kl(per_token, mask), 1.6 / 3, rtol=1e-6)


def test_fixed_controller_keeps_beta():
  state = kl.init_kl_controller(0.05)
  for value in (0.0, 6.0, 100.0):
    new = kl.update_kl_controller(state, jnp.float32(value), 64, kind="fixed")
    assert float(new.kl_coef) == pytest.approx(0.05)


@pytest.mark.parametrize(
  "current_kl, expected",
  [
    (9.0, 0.1 * (1 + 0.2 * 64 / 10000)),  # e = 0.5 clipped to 0.2: up, 0.100128
    (6.6, 0.1 * (1 + 0.1 * 64 / 10000)),  # e = 0.1 unclipped: up, 0.100064
    (6.0, 0.1),  # on target: unchanged
    (5.4, 0.1 * (1 - 0.1 * 64 / 10000)),  # e = -0.1: down, 0.099936
    (0.0, 0.1 * (1 - 0.2 * 64 / 10000)),  # e = -1 clipped to -0.2: down, 0.099872
  ],
)
def test_adaptive_controller_exact_step(current_kl, expected):
  state = kl.init_kl_controller(0.1)
  new = kl.adaptive_kl_update(state, jnp.float32(current_kl), 64, target=6.0, horizon=10000)
  assert float(new.kl_coef) == pytest.approx(expected, rel=1e-6)
  # The direction of the move follows the sign of KL - target (compared in float32).
  assert np.sign(new.kl_coef - state.kl_coef) == np.sign(current_kl - 6.0)


def test_adaptive_controller_jits_and_is_a_checkpointable_pytree():
  state = kl.init_kl_controller(0.1)
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.float32 and leaves[0].shape == ()

  @jax.jit
  def run(state, kls):
    step = lambda s, k: (kl.update_kl_controller(s, k, 64, kind="adaptive", target=6.0), None)
    return jax.lax.scan(step, state, kls)[0]

  # Two steps far above the target: beta * 1.00128^2.
  final = run(state, jnp.array([20.0, 30.0]))
  assert float(final.kl_coef) == pytest.approx(0.1 * 1.00128**2, rel=1e-6)


def test_controller_configuration_errors():
  state = kl.init_kl_controller(0.1)
  with pytest.raises(ValueError, match="target"):
    kl.update_kl_controller(state, jnp.float32(1.0), 8, kind="adaptive")
  with pytest.raises(ValueError, match="pid"):
    kl.update_kl_controller(state, jnp.float32(1.0), 8, kind="pid", target=6.0)


def test_estimators_jit():
  logp = jnp.array([[-1.0, -2.0, -0.3]])
  ref_logp = jnp.array([[-1.5, -1.5, -0.1]])
  mask = jnp.array([[True, True, False]])
  for kind in ("k1", "k2", "k3"):
    jitted = jax.jit(kl.kl_penalty, static_argnames="kind")(logp, ref_logp, kind=kind, mask=mask)
    np.testing.assert_allclose(jitted, kl.kl_penalty(logp, ref_logp, kind, mask), rtol=1e-6)
  eager = kl.objective_kl(logp - ref_logp, mask)
  np.testing.assert_allclose(jax.jit(kl.objective_kl)(logp - ref_logp, mask), eager, rtol=1e-6)
  assert math.isclose(float(eager), 0.5 - 0.5, abs_tol=1e-6)


@pytest.mark.parametrize("field, value", [("target", 0.0), ("target", -1.0), ("horizon", 0.0)])
def test_adaptive_controller_refuses_a_non_positive_target_or_horizon(field, value):
  # target=0 made beta NaN (kl / 0); a zero horizon divides by zero too.
  state = kl.init_kl_controller(0.1)
  args = {"target": 6.0, "horizon": 10000.0, field: value}
  with pytest.raises(ValueError, match=f"needs a {field} > 0"):
    kl.adaptive_kl_update(state, jnp.float32(1.0), 64, **args)
