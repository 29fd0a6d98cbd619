"""LoRA adapters (rlhf_jax/models/lora.py): a fresh adapter changes nothing, merged equals
unmerged, only adapters train, dropout only with its RNG, and stages export merged."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import errors, models, optim, sharding
from rlhf_jax.models import lora

TOKENS = jnp.asarray([[1, 5, 9, 13, 17, 21, 25, 29], [1, 7, 7, 7, 3, 2, 8, 30]], jnp.int32)


def _model(scan_layers=True, **lora_fields):
  cfg = models.get_model_config("tiny", scan_layers=scan_layers)
  cfg = cfg.replace(lora_rank=4, lora_alpha=8.0, **lora_fields)
  module = models.LanguageModel(cfg)
  return module, sharding.unbox(models.init_params(module, jax.random.key(0)))


def _randomize_b(params, key):
  """Non-zero B everywhere, so the adapters change the model."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, x) in enumerate(leaves):
    name = path[-1].key
    if name.endswith(lora.SUFFIX_B):
      x = 0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fresh_adapters_change_nothing_and_merged_equals_unmerged(scan_layers):
  module, params = _model(scan_layers)
  plain = models.LanguageModel(lora.plain(module.config))
  adapted_fn = jax.jit(lambda p: module.apply({"params": p}, TOKENS)[0])
  plain_fn = jax.jit(lambda p: plain.apply({"params": p}, TOKENS)[0])
  base_logits = plain_fn(lora.base(params))
  np.testing.assert_array_equal(adapted_fn(params), base_logits)  # B = 0: exactly the base
  trained = _randomize_b(params, jax.random.key(1))
  unmerged = adapted_fn(trained)
  merged = plain_fn(lora.merge(trained, module.config))
  assert np.abs(unmerged - base_logits).max() > 1e-2  # the adapters do something
  np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=0)
  assert not jax.tree.leaves(lora.adapters(lora.merge(trained, module.config)))


def test_targets_choose_the_projections():
  _, params = _model(lora_targets="q,down")
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(lora.adapters(params))[0]}
  assert names == {"q_lora_a", "q_lora_b", "down_lora_a", "down_lora_b"}
  assert lora.check_targets("q,qq") == "unknown projections ['qq']; choose among " + ", ".join(
    lora.TARGETS
  )
  assert lora.check_targets("q, v") is None


def test_only_adapters_train_and_hold_optimizer_state():
  from rlhf_jax.trainers import sft

  module, params = _model()
  tx, schedule = optim.make_optimizer({"lr": 1e-2, "warmup_steps": 0}, 10, trainable=lora.TRAINABLE)
  state = sft.init_from(params, jax.random.key(2), tx=tx)
  # Adam's moments exist for the adapters only.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert moments == 2 * lora.num_params(lora.adapters(params))
  batch = {"tokens": TOKENS, "input_mask": jnp.ones(TOKENS.shape, bool),
           "loss_mask": jnp.ones(TOKENS.shape, bool)}  # fmt: skip
  update = jax.jit(functools.partial(sft.update, module=module, tx=tx, schedule=schedule))
  for _ in range(2):  # the first step moves B off zero, the second then moves A too
    state, metrics = update(state, batch)
  assert np.isfinite(metrics["loss"])
  changed = jax.tree.map(lambda a, b: bool((a != b).any()), params, state["params"])
  flat = jax.tree_util.tree_flatten_with_path(changed)[0]
  assert {p[-1].key for p, c in flat if c} == {
    p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(lora.adapters(params))[0]
  }


def test_dropout_needs_its_rng():
  module, params = _model(lora_dropout=0.5)
  params = _randomize_b(params, jax.random.key(3))
  apply = jax.jit(lambda p, rngs: module.apply({"params": p}, TOKENS, rngs=rngs)[0])
  a, b = apply(params, None), apply(params, None)
  np.testing.assert_array_equal(a, b)  # evaluation: no dropout
  c = apply(params, {"dropout": jax.random.key(4)})
  d = apply(params, {"dropout": jax.random.key(5)})
  assert np.abs(c - a).max() > 1e-4 and np.abs(c - d).max() > 1e-4


def test_a_lora_section_needs_a_starting_model():
  from rlhf_jax import config_utils
  from rlhf_jax.trainers import sft

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = config_utils.load_config(os.path.join(repo, "configs/sft.py:runlocal"))
  config.lora.rank = 4
  with pytest.raises(errors.ConfigError, match=r"config\.lora\.rank=4 trains low-rank adapters"):
    sft.CONFIG_SPEC.validate(config)
  config.lora.update(rank=0, targets="q,x")
  with pytest.raises(errors.ConfigError, match=r"config\.lora\.targets='q,x': unknown"):
    sft.CONFIG_SPEC.validate(config)


def test_ppo_and_grpo_refuse_adapter_dropout():
  from rlhf_jax import config_utils
  from rlhf_jax.trainers import grpo, ppo

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name, spec in (("ppo", ppo.CONFIG_SPEC), ("grpo", grpo.CONFIG_SPEC)):
    config = config_utils.load_config(os.path.join(repo, f"configs/{name}.py:runlocal"))
    config.lora.update(rank=4, dropout=0.1)
    with pytest.raises(errors.ConfigError, match=r"config\.lora\.dropout=0\.1: this trainer"):
      spec.validate(config)
    config.lora.dropout = 0.0
    spec.validate(config)


def test_only_adapters_get_gradients():
  """Frozen weights are behind a stop-gradient: zero gradients, and the backward pass has
  no matmul that would compute them (fewer dot products than full fine-tuning's)."""
  module, params = _model(lora_targets="q,v")
  params = _randomize_b(params, jax.random.key(6))

  def loss(p, pattern):
    logits, _ = module.apply({"params": lora.stop_frozen(p, pattern)}, TOKENS)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = jax.jit(jax.grad(lambda p: loss(p, lora.trainable(module.config))))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in flat:
    assert bool(np.asarray(g).any()) == lora.is_adapter(path[-1].key), path
  count = lambda pattern: str(jax.make_jaxpr(jax.grad(lambda p: loss(p, pattern)))(params)).count(
    "dot_general"
  )
  assert count(lora.TRAINABLE) < count(None)
