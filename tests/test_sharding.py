"""Sharding: meshes, rules, sharded init, and one update that matches single-device.

Runs on 8 fake CPU devices (tests/conftest.py). Tolerance: float32, rtol 2e-5
and atol 2e-6 on the loss, gradients and updated parameters; sharded matmuls
and reductions sum in a different order, so bit equality is not expected.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from rlhf_jax import models, sharding
from rlhf_jax.rl.logprobs import shift_for_next_token, token_logprobs

RTOL, ATOL = 2e-5, 2e-6
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def test_make_mesh_resolves_minus_one_and_validates():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.make_mesh((1, 1, 1), jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh((2, 2, 1))
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.make_mesh((8,))


def test_logical_to_spec_rules_and_divisibility_fallback():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.get_rules("fsdp_tp")
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh, rules) == jax.P("fsdp", "tensor")
  assert sharding.logical_to_spec(("act_batch", "act_len"), (8, 3), mesh, rules) == jax.P(
    ("data", "fsdp")
  )
  # 6 rows do not split 4 ways: keep the longest dividing prefix of (data, fsdp).
  assert sharding.logical_to_spec(("act_batch",), (6,), mesh, rules) == jax.P("data")
  # One kv head cannot be split over tensor=2: replicated.
  assert sharding.logical_to_spec(("embed", "kv_heads"), (8, 1), mesh, rules) == jax.P("fsdp")
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh, "dp") == jax.P()
  with pytest.raises(ValueError, match="Unknown sharding rules preset"):
    sharding.get_rules("zero3")


def _model():
  cfg = models.get_model_config("tiny", vocab_size=128, num_kv_heads=2)
  return models.LanguageModel(cfg)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 128, size=(8, 12)).astype(np.int32)
  mask = np.ones((8, 12), bool)
  mask[1, :5] = False  # a left-padded row
  mask[5, 9:] = False  # a right-padded row
  return {"tokens": tokens, "mask": mask}


def _loss_fn(module, params, batch):
  tokens, mask = batch["tokens"], batch["mask"]
  logits, _ = module.apply(
    {"params": params},
    tokens,
    models.positions_from_mask(mask),
    models.causal_attention_mask(mask),
  )
  targets, target_mask = shift_for_next_token(tokens, mask)
  logp = token_logprobs(logits, targets)
  return -jnp.sum(logp * target_mask) / jnp.sum(target_mask)


def _update_fn(module, tx):
  def update(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: _loss_fn(module, p, batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  return update


def _optimizer():
  # Adam's first step is lr * g / (|g| + eps): with eps=1e-8 it turns a 1e-9
  # reduction-order difference in a near-zero gradient into a visible change.
  # eps=1e-4 keeps the comparison well-conditioned without hiding real errors.
  return optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)


@pytest.fixture(scope="module")
def reference():
  """The single-device result of one AdamW update."""
  module = _model()
  tx = _optimizer()
  params = meta.unbox(models.init_params(module, jax.random.key(0)))
  params = jax.device_put(params, jax.devices()[0])
  out = jax.jit(_update_fn(module, tx))(params, tx.init(params), _batch())
  return params, out


# Every mesh with the FSDP + tensor preset; the other presets on the mixed meshes.
CASES = [("fsdp_tp", m) for m in MESHES] + [
  (p, m) for p in ("fsdp", "dp") for m in ((2, 2, 2), (1, 4, 2))
]


@pytest.mark.parametrize(("preset", "mesh_shape"), CASES)
def test_sharded_update_matches_single_device(reference, preset, mesh_shape):
  ref_params, (ref_new, _, ref_loss, ref_grads) = reference
  module = _model()
  tx = _optimizer()
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
  params, shardings = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, preset, jax.random.key(0)
  )
  # Same initial values as the unsharded init.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), params, ref_params
  )

  opt_shardings = jax.tree.map(lambda x: x.sharding, jax.eval_shape(tx.init, params))
  with sharding.use_mesh(mesh, preset):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    batch = sharding.host_to_global(_batch(), mesh)
    update = jax.jit(
      _update_fn(module, tx),
      in_shardings=(shardings, opt_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, opt_shardings, None, shardings),
      donate_argnums=(0, 1),
    )
    new, _, loss, grads = update(params, opt_state, batch)

  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  jax.tree.map(close, grads, ref_grads)
  jax.tree.map(close, new, ref_new)
  # Outputs keep the layout the rules prescribe.
  jax.tree.map(
    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)), new, shardings
  )


def test_parameter_layout_follows_rules():
  module = _model()
  mesh = sharding.make_mesh((2, 2, 2))
  params, _ = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, "fsdp_tp", jax.random.key(0)
  )
  layers = params["trunk"]["layers"]
  spec = lambda x: x.sharding.spec
  # Scanned layers stack on a leading unsharded "layers" axis.
  assert spec(layers["attn"]["q"]) == jax.P(None, "fsdp", "tensor")  # [L, D, N, H]
  assert spec(layers["attn"]["k"]) == jax.P(None, "fsdp", "tensor")  # [L, D, K, H]
  assert spec(layers["attn"]["o"]) == jax.P(None, "tensor", None, "fsdp")  # [L, N, H, D]
  assert spec(layers["mlp"]["up"]) == jax.P(None, "fsdp", "tensor")  # [L, D, F]
  assert spec(layers["mlp"]["down"]) == jax.P(None, "tensor", "fsdp")  # [L, F, D]
  assert spec(params["trunk"]["embedding"]) == jax.P("tensor", "fsdp")  # [V, D]
  assert spec(layers["attn_norm"]["scale"]) == jax.P()
  # Each device holds 1/4 of q (fsdp=2 x tensor=2) and all of the norm scale.
  q = layers["attn"]["q"]
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, 16)

  dp, _ = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, "dp", jax.random.key(0)
  )
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dp))


def test_host_to_global_and_reshard():
  mesh = sharding.make_mesh((2, 4, 1))
  batch = _batch()
  out = sharding.host_to_global(batch, mesh)
  assert out["tokens"].sharding.spec == jax.P(("data", "fsdp"), None)
  assert len(out["tokens"].addressable_shards) == 8
  assert out["tokens"].addressable_shards[0].data.shape == (1, 12)
  np.testing.assert_array_equal(out["tokens"], batch["tokens"])

  other = sharding.make_mesh((1, 1, 8))
  target = jax.sharding.NamedSharding(other, jax.P(None, "tensor"))
  x = jnp.arange(64.0).reshape(4, 16)
  moved = sharding.reshard({"x": x}, {"x": target})["x"]
  assert moved.sharding == target
  np.testing.assert_array_equal(moved, x)
