"""Sampler: log-probs match the training path, left padding, EOS masking, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models, sharding
from rlhf_jax.rl import sampler
from rlhf_jax.rl.logprobs import token_logprobs

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [20]]
P = 6


@pytest.fixture(scope="module")
def policy():
  cfg = models.get_model_config("tiny")
  module = models.LanguageModel(cfg)
  return module, meta.unbox(models.init_params(module, jax.random.key(0)))


def _left_padded(prompts, length=P):
  tokens = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p) :] = p
    mask[i, length - len(p) :] = True
  return tokens, mask


def _recompute_logprobs(module, params, prompt, pmask, out, temperature):
  """The training path: one forward pass over prompt + response."""
  full = np.concatenate([prompt, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([pmask, np.asarray(out.response_mask)], 1)
  logits, _ = jax.jit(module.apply)(  # one program, not op-by-op dispatch
    {"params": params},
    full,
    models.positions_from_mask(fmask),
    models.causal_attention_mask(fmask),
  )
  p = prompt.shape[1]
  return token_logprobs(logits[:, p - 1 : -1], full[:, p:], temperature)


@pytest.mark.parametrize(
  ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 0.9)]
)
def test_logprobs_equal_training_path_recomputation(policy, temperature, top_k, top_p):
  module, params = policy
  config = sampler.SamplerConfig(
    max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=temperature, top_k=top_k, top_p=top_p
  )
  prompt, pmask = _left_padded(PROMPTS)
  out = sampler.make_sampler(module, config)(params, prompt, pmask, jax.random.key(1))
  assert out.tokens.shape == out.logprobs.shape == (4, 10)
  expected = _recompute_logprobs(module, params, prompt, pmask, out, temperature)
  m = np.asarray(out.response_mask)
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(expected)[m], atol=2e-5)
  # At a different temperature the log-probs differ: the test can tell.
  other = _recompute_logprobs(module, params, prompt, pmask, out, temperature * 2)
  assert np.abs(np.asarray(other)[m] - np.asarray(out.logprobs)[m]).max() > 1e-2
  # Truncation (and PAD, never drawn) only removes mass, so the drawn log-prob is higher.
  sample, full = np.asarray(out.sample_logprobs)[m], np.asarray(out.logprobs)[m]
  assert np.all(sample >= full - 1e-6)
  if top_k or top_p < 1:
    assert np.any(sample > full + 1e-3)
  else:  # by exactly the mass PAD had
    full_mask = np.concatenate([pmask, np.asarray(out.response_mask)], 1)
    logits, _ = module.apply(
      {"params": params},
      np.concatenate([prompt, np.asarray(out.tokens)], 1),
      models.positions_from_mask(full_mask),
      models.causal_attention_mask(full_mask),
    )
    pad = jax.nn.softmax(logits[:, P - 1 : -1] / temperature)[..., PAD]
    np.testing.assert_allclose(sample - full, -np.log1p(-np.asarray(pad)[m]), atol=1e-4)


@pytest.mark.parametrize("greedy", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(policy, greedy):
  module, params = policy
  config = sampler.SamplerConfig(
    max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.8, greedy=greedy
  )
  fn = sampler.make_sampler(module, config)
  prompt, pmask = _left_padded(PROMPTS)
  batch = fn(params, prompt, pmask, jax.random.key(3))
  for i, p in enumerate(PROMPTS):
    alone = fn(params, np.array([p], np.int32), np.ones((1, len(p)), bool), jax.random.key(3))
    if greedy:
      np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
      np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=2e-5)
    else:
      # Random draws depend on the batch shape; the distribution must not:
      # score row i's sampled tokens with the single-prompt model.
      single = _recompute_logprobs(
        module,
        params,
        np.array([p], np.int32),
        np.ones((1, len(p)), bool),
        jax.tree.map(lambda x: x[i : i + 1], batch),
        0.8,
      )
      m = np.asarray(batch.response_mask[i])
      np.testing.assert_allclose(
        np.asarray(single[0])[m], np.asarray(batch.logprobs[i])[m], atol=2e-5
      )


def test_truncation_at_eos_is_a_mask():
  # A 6-token vocabulary at high temperature emits EOS (id 1) early and often.
  cfg = models.get_model_config("tiny", vocab_size=6)
  module = models.LanguageModel(cfg)
  params = meta.unbox(models.init_params(module, jax.random.key(0)))
  config = sampler.SamplerConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=3.0)
  prompt, pmask = _left_padded([[2, 3, 4], [5], [3, 3], [4, 2, 5, 3]] * 4)
  out = sampler.make_sampler(module, config)(params, prompt, pmask, jax.random.key(7))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
  saw_truncated = False
  for row, row_mask, length, has_eos in zip(tokens, mask, out.lengths, out.has_eos, strict=True):
    eos_at = np.flatnonzero(row == EOS)
    if len(eos_at):
      first = eos_at[0]
      assert has_eos and length == first + 1
      assert row_mask[: first + 1].all() and not row_mask[first + 1 :].any()
      assert (row[first + 1 :] == PAD).all()
      saw_truncated |= first + 1 < len(row)
    else:
      assert not has_eos and length == len(row) and row_mask.all()
  assert out.has_eos.any() and saw_truncated
  assert (np.asarray(out.logprobs)[~mask] == 0).all()


def test_top_k_one_and_tiny_top_p_are_greedy(policy):
  module, params = policy
  prompt, pmask = _left_padded(PROMPTS)
  base = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  greedy = sampler.make_sampler(module, sampler.SamplerConfig(**base, greedy=True))
  top1 = sampler.make_sampler(module, sampler.SamplerConfig(**base, top_k=1))
  nucleus = sampler.make_sampler(module, sampler.SamplerConfig(**base, top_p=1e-6))
  ref = greedy(params, prompt, pmask, jax.random.key(0)).tokens
  np.testing.assert_array_equal(top1(params, prompt, pmask, jax.random.key(5)).tokens, ref)
  np.testing.assert_array_equal(nucleus(params, prompt, pmask, jax.random.key(6)).tokens, ref)


def test_filter_logits_hand_example():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
  neg = jnp.finfo(jnp.float32).min
  np.testing.assert_array_equal(
    sampler.filter_logits(logits, top_k=2) == neg, [[False, False, False, True]]
  )  # ties at the k-th value are kept
  # top_p=0.6: 0.5 alone is not enough, 0.5 + 0.2 reaches it.
  kept = sampler.filter_logits(logits, top_p=0.6) > neg
  assert int(kept.sum()) == 3  # both 0.2s tie at the cutoff
  kept = sampler.filter_logits(logits, top_p=0.5) > neg
  np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_sampling_is_seeded_and_generation_is_one_loop(policy):
  module, params = policy
  config = sampler.SamplerConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD)
  fn = sampler.make_sampler(module, config)
  prompt, pmask = _left_padded(PROMPTS)
  a = fn(params, prompt, pmask, jax.random.key(1)).tokens
  b = fn(params, prompt, pmask, jax.random.key(1)).tokens
  c = fn(params, prompt, pmask, jax.random.key(2)).tokens
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  # Decoding is a while_loop inside one program, not a Python loop per token.
  jaxpr = jax.make_jaxpr(lambda p, t, m, r: sampler.generate(module, p, t, m, r, config))(
    params, prompt, pmask, jax.random.key(1)
  )
  assert sum(eq.primitive.name == "while" for eq in jaxpr.jaxpr.eqns) == 1


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_sampler_matches_single_device(policy, mesh_shape):
  module, params = policy
  config = sampler.SamplerConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, greedy=True)
  prompt, pmask = _left_padded(PROMPTS * 2)
  ref = sampler.make_sampler(module, config)(params, prompt, pmask, jax.random.key(0))
  mesh = sharding.make_mesh(mesh_shape)
  sharded_params, shardings = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, "fsdp_tp", jax.random.key(0)
  )
  fn = sampler.make_sampler(module, config, mesh=mesh, param_shardings=shardings)
  out = fn(sharded_params, prompt, pmask, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-5)
  assert out.tokens.sharding.spec == jax.P(("data", "fsdp"), None)


def test_config_validation():
  with pytest.raises(ValueError, match="pad_id == eos_id"):
    sampler.SamplerConfig(max_new_tokens=4, eos_id=1, pad_id=1)
  with pytest.raises(ValueError, match="temperature"):
    sampler.SamplerConfig(max_new_tokens=4, eos_id=1, pad_id=0, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplerConfig(max_new_tokens=4, eos_id=1, pad_id=0, top_p=0.0)


@pytest.mark.parametrize("greedy", [False, True])
def test_pad_and_ids_past_the_tokenizer_are_never_drawn(greedy):
  """A 6-row embedding table whose tokenizer uses ids < 4: ids 4 and 5 (and PAD) never
  appear in a response, though the model gives them probability."""
  cfg = models.get_model_config("tiny", vocab_size=6)
  module = models.LanguageModel(cfg)
  params = meta.unbox(models.init_params(module, jax.random.key(0)))
  # Make the banned ids the model's favourites, so drawing them would be likely.
  params["trunk"]["embedding"] = params["trunk"]["embedding"].at[4:].multiply(30.0)
  params["trunk"]["embedding"] = params["trunk"]["embedding"].at[PAD].multiply(30.0)
  prompt, pmask = _left_padded([[2, 3, 4], [5], [3, 3], [4, 2, 5, 3]] * 4)
  drawn = {}
  for num_valid in (0, 4):
    config = sampler.SamplerConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=3.0,
                                   greedy=greedy, num_valid=num_valid)  # fmt: skip
    out = sampler.make_sampler(module, config)(params, prompt, pmask, jax.random.key(7))
    drawn[num_valid] = set(np.asarray(out.tokens)[np.asarray(out.response_mask)].tolist())
  assert PAD not in drawn[0] and drawn[0] & {4, 5}  # without the limit they are drawn
  assert drawn[4] <= {1, 2, 3}
  logits = jnp.zeros((2, 6))
  banned = sampler.ban_invalid(logits, sampler.SamplerConfig(1, EOS, PAD, num_valid=4))
  assert np.isneginf(np.asarray(banned)[:, [PAD, 4, 5]]).all() and (banned[:, 1:4] == 0).all()
