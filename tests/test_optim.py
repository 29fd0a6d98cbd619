"""Tests for rlhf_jax.optim: schedules, TF Adam, weight decay, clipping, accumulation, freezing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax import optim

SHAPES = {"dense": {"kernel": (3, 4), "bias": (4,)}, "embedder": {"embedding": (5, 3)}}
TRAINABLE_SIZE = 3 * 4 + 4  # dense kernel + bias; the embedder (15) is what tests freeze.


def make_params(value=1.0):
  return jax.tree.map(lambda s: jnp.full(s, value, jnp.float32), SHAPES, is_leaf=_is_shape)


def make_grads(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32), SHAPES, is_leaf=_is_shape
  )


def _is_shape(x):
  return isinstance(x, tuple)


def config(**overrides):
  c = optim.default_config()
  c.update(overrides)
  return c


def run_steps(tx, params, grads_seq):
  """Applies tx to each gradient in turn; returns the final params and state."""
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
  "name, expected",
  [
    ("constant", {0: 0.1, 5: 0.1, 110: 0.1}),
    ("warmup_constant", {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.1, 500: 0.1}),
    ("linear", {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.05, 110: 0.0, 500: 0.0}),
    # Midpoint of the cosine phase: 0.1 * (0.1 + 0.9 * 0.5); the end is 0.1 * 0.1.
    ("cosine", {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.055, 110: 0.01, 500: 0.01}),
  ],
)
def test_schedule_values(name, expected):
  _, schedule = optim.make_optimizer(
    config(schedule=name, lr=0.1, warmup_steps=10, final_lr_fraction=0.1), total_steps=110
  )
  jitted = jax.jit(schedule)
  for step, lr in expected.items():
    np.testing.assert_allclose(schedule(step), lr, atol=1e-7, err_msg=f"{name} at {step}")
    np.testing.assert_allclose(jitted(jnp.int32(step)), lr, atol=1e-7, err_msg=f"{name} jit")


def test_schedule_without_warmup_starts_at_peak():
  _, schedule = optim.make_optimizer(config(schedule="cosine", lr=0.2), total_steps=10)
  np.testing.assert_allclose(schedule(0), 0.2, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 0.0, atol=1e-7)


# ---------------------------------------------------------------- TF-style Adam


def numpy_tf_adam(params, grads_seq, lrs, b1, b2, eps):
  """The lm-human-preferences / tf.train.AdamOptimizer update, in float64 NumPy."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
    lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      p[k] = p[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
  return p


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_tf_adam_matches_numpy_and_differs_from_optax_adam(schedule):
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)}
  # Gradients ~1e-4, the regime where an eps of 1e-5 matters.
  rng = np.random.default_rng(0)
  grads_seq = [{"w": jnp.asarray(1e-4 * rng.standard_normal((2, 3)), jnp.float32)} for _ in "abc"]
  lr, b1, b2 = 0.01, 0.8, 0.99
  c = config(name="adam_tf", lr=lr, b1=b1, b2=b2, schedule=schedule, grad_clip_norm=0)
  tx, sched = optim.make_optimizer(c, total_steps=4)

  got, _ = run_steps(tx, params, grads_seq)
  lrs = [lr * (1 - s / 4) if schedule == "linear" else lr for s in range(3)]
  np.testing.assert_allclose([float(sched(s)) for s in range(3)], lrs, rtol=1e-6)
  # eps is left unset: adam_tf's default must be TensorFlow's 1e-5 as used by OpenAI.
  want = numpy_tf_adam(params, grads_seq, lrs, b1, b2, eps=1e-5)
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-8)

  sched_optax = optax.adam(sched, b1=b1, b2=b2, eps=1e-5)
  optax_params, _ = run_steps(sched_optax, params, grads_seq)
  tf_delta = np.asarray(got["w"] - params["w"])
  optax_delta = np.asarray(optax_params["w"] - params["w"])
  assert np.max(np.abs(tf_delta - optax_delta) / np.abs(optax_delta)) > 0.1


def test_scale_by_tf_adam_first_step_by_hand():
  # t=1, b1=0.9, b2=0.999: m = 0.1 g, v = 0.001 g^2, correction = sqrt(0.001) / 0.1.
  tx = optim.scale_by_tf_adam(b1=0.9, b2=0.999, eps=1e-5)
  g = jnp.array([2e-4, -1.0], jnp.float32)
  out, state = tx.update(g, tx.init(g))
  m, v = 0.1 * np.array([2e-4, -1.0]), 0.001 * np.array([2e-4, -1.0]) ** 2
  want = np.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + 1e-5)
  np.testing.assert_allclose(out, want, rtol=1e-5)
  assert int(state.count) == 1


# ---------------------------------------------------------------- weight decay, clipping


def test_adamw_decays_kernels_not_biases():
  # Zero gradients make Adam's part of the update exactly 0, leaving only the decay.
  c = config(name="adamw", lr=0.1, weight_decay=0.5, grad_clip_norm=0)
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = make_params(2.0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["embedder"]["embedding"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_weight_decay_min_ndim_zero_decays_biases():
  c = config(name="adamw", lr=0.1, weight_decay=0.5, weight_decay_min_ndim=0)
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = make_params(2.0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1, rtol=1e-6)


def test_plain_adam_refuses_weight_decay():
  with pytest.raises(ValueError, match="adamw"):
    optim.make_optimizer(config(name="adam", weight_decay=0.1), total_steps=10)


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_clipping_huge_gradient(clip):
  tx, _ = optim.make_optimizer(config(name="sgd", lr=1.0, grad_clip_norm=clip), total_steps=10)
  params = make_params()
  grads = make_grads(1, scale=1e4)
  updates, _ = tx.update(grads, tx.init(params), params)
  grad_norm = optim.l2_norm(grads)
  if clip:
    want = jax.tree.map(lambda g: -g * clip / grad_norm, grads)
    np.testing.assert_allclose(optim.l2_norm(updates), clip, rtol=1e-5)
  else:
    want = jax.tree.map(lambda g: -g, grads)
    np.testing.assert_allclose(optim.l2_norm(updates), grad_norm, rtol=1e-6)
  assert_trees_close(updates, want, rtol=1e-5)


def test_l2_norm():
  tree = {"a": jnp.array([3.0, 4.0]), "b": [jnp.zeros((2, 2)), jnp.array([[12.0]])]}
  np.testing.assert_allclose(optim.l2_norm(tree), 13.0, rtol=1e-6)
  # 300^2 overflows float16 (max 65504); the norm must still be exact.
  half = {"x": jnp.array([300.0, 400.0], jnp.float16)}
  assert optim.l2_norm(half).dtype == jnp.float32
  np.testing.assert_allclose(optim.l2_norm(half), 500.0, rtol=1e-6)
  assert float(optim.l2_norm({})) == 0.0


# ---------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_step_on_mean():
  # Linear decay to 0 over 2 updates: lr 0.1 then 0.05. If the schedule counted
  # micro-steps, the second accumulated update would use lr(2) = 0 instead.
  common = dict(name="adamw", lr=0.1, weight_decay=0.1, schedule="linear", grad_clip_norm=1.0)
  tx_ref, _ = optim.make_optimizer(config(**common), total_steps=2)
  tx_acc, _ = optim.make_optimizer(config(**common, grad_accum_steps=2), total_steps=2)
  micro = [make_grads(seed) for seed in range(4)]
  means = [jax.tree.map(lambda a, b: (a + b) / 2, micro[i], micro[i + 1]) for i in (0, 2)]

  params = make_params()
  state = tx_acc.init(params)
  updates, state = tx_acc.update(micro[0], state, params)
  after_first = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, after_first, params)

  acc_params, _ = run_steps(tx_acc, params, micro)
  ref_params, _ = run_steps(tx_ref, params, means)
  assert_trees_close(acc_params, ref_params, rtol=1e-5, atol=1e-7)
  assert not np.allclose(acc_params["dense"]["kernel"], params["dense"]["kernel"])


# ---------------------------------------------------------------- freezing


def state_array_sizes(state):
  """Total size of non-scalar state leaves (moments, accumulators), and their shapes."""
  leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  return sum(x.size for x in leaves), {x.shape for x in leaves}


@pytest.mark.parametrize("accum", [1, 2])
def test_freeze_gives_zero_updates_and_no_state(accum):
  c = config(
    name="adamw", lr=0.1, weight_decay=0.1, freeze=("embedder/.*",), grad_accum_steps=accum
  )
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = make_params()
  new_params, state = run_steps(tx, params, [make_grads(s) for s in range(2 * accum)])

  np.testing.assert_array_equal(
    new_params["embedder"]["embedding"], params["embedder"]["embedding"]
  )
  for name in ("kernel", "bias"):
    assert not np.allclose(new_params["dense"][name], params["dense"][name]), name
  # Adam's mu and nu, plus MultiSteps' accumulator when accumulating: trainable params only.
  size, shapes = state_array_sizes(state)
  assert size == (2 + (accum > 1)) * TRAINABLE_SIZE
  assert (5, 3) not in shapes

  unfrozen, _ = optim.make_optimizer(config(name="adamw", grad_accum_steps=accum), 10)
  assert state_array_sizes(unfrozen.init(params))[0] > size  # the check above can fail


def test_frozen_gradients_do_not_count_towards_clipping():
  # A plain dict, and a bare string rather than a tuple of regexes.
  fields = dict(name="sgd", lr=1.0, grad_clip_norm=1.0, freeze="embedder/embedding")
  tx, _ = optim.make_optimizer(fields, total_steps=10)
  params = make_params()
  grads = make_grads(2, scale=0.1)
  grads["embedder"]["embedding"] = jnp.full((5, 3), 1e6)
  assert float(optim.l2_norm(grads["dense"])) < 1.0
  updates, _ = tx.update(grads, tx.init(params), params)
  assert_trees_close(updates["dense"], jax.tree.map(lambda g: -g, grads["dense"]), rtol=1e-6)
  np.testing.assert_array_equal(updates["embedder"]["embedding"], 0.0)


def test_freeze_regex_matching_nothing_is_an_error():
  tx, _ = optim.make_optimizer(config(freeze=("dense/.*", "encoder/.*")), total_steps=10)
  with pytest.raises(ValueError, match=r"encoder/\.\*") as info:
    tx.init(make_params())
  assert "dense/kernel" in str(info.value)  # lists the paths a user could have meant


def test_invalid_freeze_regex_is_an_error():
  with pytest.raises(ValueError, match=r"dense/\("):
    optim.make_optimizer(config(freeze=("dense/(",)), total_steps=10)


# ---------------------------------------------------------------- config errors


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError, match="name='lion'") as info:
    optim.make_optimizer(config(name="lion"), total_steps=10)
  for choice in optim.OPTIMIZER_NAMES:
    assert choice in str(info.value)


def test_unknown_schedule_lists_choices():
  with pytest.raises(ValueError, match="schedule='rsqrt'") as info:
    optim.make_optimizer(config(schedule="rsqrt"), total_steps=10)
  for choice in optim.SCHEDULE_NAMES:
    assert choice in str(info.value)


def test_unknown_field_is_an_error():
  with pytest.raises(ValueError, match="learning_rate"):
    optim.make_optimizer({"learning_rate": 0.1}, total_steps=10)


def test_linear_schedule_needs_steps_after_warmup():
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_optimizer(config(schedule="linear", warmup_steps=10), total_steps=10)


# ---------------------------------------------------------------- config forms, jit, state


def test_plain_dict_and_config_dict_agree():
  fields = dict(name="adam_tf", lr=0.05, schedule="cosine", warmup_steps=1, freeze=["embedder/.*"])
  tx_dict, _ = optim.make_optimizer(fields, total_steps=5)
  tx_cd, _ = optim.make_optimizer(ml_collections.ConfigDict(fields), total_steps=5)
  grads = [make_grads(s) for s in range(3)]
  p_dict, _ = run_steps(tx_dict, make_params(), grads)
  p_cd, _ = run_steps(tx_cd, make_params(), grads)
  jax.tree.map(np.testing.assert_array_equal, p_dict, p_cd)
  assert not np.allclose(p_dict["dense"]["kernel"], 1.0)


def test_jit_update_matches_eager_and_state_is_arrays():
  c = config(
    name="adam_tf",
    lr=0.1,
    schedule="linear",
    warmup_steps=1,
    weight_decay=0.01,
    grad_accum_steps=2,
    freeze=("embedder/.*",),
  )
  tx, _ = optim.make_optimizer(c, total_steps=5)
  params = make_params()

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # State is built abstractly first, as trainers do before sharding it.
  abstract = jax.eval_shape(tx.init, params)
  state = jax.jit(tx.init)(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))

  jit_params = eager_params = params
  jit_state, eager_state = state, tx.init(params)
  for s in range(6):
    grads = make_grads(s)
    jit_params, jit_state = step(jit_params, jit_state, grads)
    updates, eager_state = tx.update(grads, eager_state, eager_params)
    eager_params = optax.apply_updates(eager_params, updates)
  assert_trees_close(jit_params, eager_params, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jit_params["dense"]["kernel"], params["dense"]["kernel"])
