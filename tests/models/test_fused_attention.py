"""The fused attention option (ModelConfig.attention_impl): jax.nn.dot_product_attention
must compute what the einsum path computes, wherever the model uses its outputs.

On CPU "fused" runs JAX's XLA implementation of the kernel, so these tests pin down the
layout, the scale, the mask (padding, packing, windows, cache slots) and the grouped-query
heads handed to it; cuDNN's choice is tested as a decision (`attention_kernel`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import transformer
from rlhf_jax.rl import sampler

CASES = {
  "mha": dict(num_kv_heads=0),  # one kv head per query head, scanned layers
  # Gemma-like, soft-cap left out, on the "tiny" preset's 4 query heads over 2 kv heads: q/k
  # norms, a scaled query, a local layer with its own RoPE base then a global one (per-layer
  # windows).
  "gemma": dict(
    qk_norm=True,
    zero_centered_norm=True,
    post_norms=True,
    query_pre_attn_scalar=24.0,
    sliding_window=3,
    sliding_window_pattern=2,
    rope_local_theta=1000.0,
  ),
  # Mistral-like: every layer local, one kv head for all query heads, unrolled layers.
  "mistral": dict(num_kv_heads=1, sliding_window=4, scan_layers=False),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20]]


def _configs(case, **overrides):
  cfg = models.get_model_config("tiny", **{**CASES[case], **overrides})
  return cfg, cfg.replace(attention_impl="fused")


def _random(shapes, zero_centered_norm: bool):
  """Random parameters of the given (boxed) shapes, from NumPy: XLA's random bits take
  seconds to compile on CPU. Norm scales near 1 (near 0 when zero-centred) and weights of
  0.2 give attention logits of order 1, far from uniform, so a wrong mask or scale shows."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    x = rng.normal(0.0, 0.2, leaf.shape)
    if "norm" in jax.tree_util.keystr(path) and not zero_centered_norm:
      x = 1.0 + x / 2
    return jnp.asarray(x, leaf.dtype)

  return jax.tree.map_with_path(draw, meta.unbox(shapes))


@functools.cache
def _params(cfg):
  module = models.LanguageModel(cfg)
  shapes = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  return _random(shapes, cfg.zero_centered_norm)


@functools.cache
def _forward(cfg):
  """The jitted forward pass of `cfg`: compiled once per config and reused across tests."""
  module = models.LanguageModel(cfg)
  return jax.jit(lambda p, *args: module.apply({"params": p}, *args)[0])


def _left_padded(prompts, length):
  tokens = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p) :] = p
    mask[i, length - len(p) :] = True
  return tokens, mask


def _logits(cfg, params, tokens, positions, attn_mask):
  return _forward(cfg)(params, tokens, positions, attn_mask)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_logits_match_einsum_path_with_left_padding(case):
  xla, fused = _configs(case)
  params = _params(xla)
  tokens, mask = _left_padded(PROMPTS, 8)
  args = (tokens, models.positions_from_mask(mask), models.causal_attention_mask(mask))
  want, got = _logits(xla, params, *args), _logits(fused, params, *args)
  # Pad queries attend to nothing: finite (a uniform softmax, as on the einsum path) ...
  assert np.isfinite(np.asarray(got)).all()
  # ... and the rows the model uses agree.
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_fused_logits_match_with_packed_segments():
  xla, fused = _configs("gemma")
  params = _params(xla)
  segments = np.array(
    [
      [1, 1, 1, 2, 2, 0, 3, 3],
      [1, 1, 1, 1, 1, 1, 2, 2],
      [0, 0, 1, 1, 2, 2, 2, 2],
      [1, 2, 3, 0, 0, 0, 0, 0],
    ]
  )
  tokens = np.where(segments > 0, np.arange(8) + 3, 0).astype(np.int32)
  args = (
    tokens,
    models.positions_from_segments(segments),
    models.segment_attention_mask(segments),
  )
  want, got = _logits(xla, params, *args), _logits(fused, params, *args)
  assert np.isfinite(np.asarray(got)).all()
  used = segments > 0
  np.testing.assert_allclose(got[used], want[used], atol=1e-5, rtol=1e-5)


def test_fused_gradients_match():
  # One attention layer (the kernel's backward: dq, and dk, dv summed over each kv head's
  # query heads) with a window and a scaled query; a full model's backward would take many
  # seconds to compile for nothing more. Pad queries, fully masked, get no loss weight.
  xla, fused = _configs("gemma", sliding_window_pattern=0)
  attention = transformer.Attention(xla)
  _, mask = _left_padded(PROMPTS, 8)
  positions, attn_mask = models.positions_from_mask(mask), models.causal_attention_mask(mask)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(*mask.shape, xla.d_model)), jnp.float32)
  shapes = jax.eval_shape(lambda: attention.init(jax.random.key(0), x, positions, attn_mask))
  params = _random(shapes, xla.zero_centered_norm)
  target = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  weights = jnp.asarray(mask, jnp.float32)[..., None]

  def loss(p, x, cfg):
    out, _ = transformer.Attention(cfg).apply(p, x, positions, attn_mask)
    return jnp.sum(jnp.square(out - target) * weights) / jnp.sum(weights)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (want_loss, want), (got_loss, got) = grad(params, x, xla), grad(params, x, fused)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got, want)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(got))
  assert np.abs(np.asarray(want[1])).max() > 1e-3  # gradients that can tell


def test_fused_cached_greedy_decoding_gives_the_same_tokens():
  xla, fused = _configs("gemma")
  params = _params(xla)
  prompt, pmask = _left_padded(PROMPTS, 7)
  config = sampler.SamplerConfig(max_new_tokens=6, eos_id=1, pad_id=0, greedy=True)
  want = sampler.make_sampler(models.LanguageModel(xla), config)(
    params, prompt, pmask, jax.random.key(0)
  )
  got = sampler.make_sampler(models.LanguageModel(fused), config)(
    params, prompt, pmask, jax.random.key(0)
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)
  m = np.asarray(want.response_mask)
  np.testing.assert_allclose(np.asarray(got.logprobs)[m], np.asarray(want.logprobs)[m], atol=1e-5)


def test_bfloat16_fused_matches_einsum_path():
  xla, fused = _configs("mha", dtype="bfloat16")
  params = _params(xla)
  tokens, mask = _left_padded(PROMPTS, 8)
  args = (tokens, models.positions_from_mask(mask), models.causal_attention_mask(mask))
  want, got = _logits(xla, params, *args), _logits(fused, params, *args)
  assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got[mask], want[mask], atol=2e-2)


def _jaxpr(cfg, params, tokens):
  return str(jax.make_jaxpr(lambda p: _logits(cfg, p, tokens, None, None))(params))


def test_auto_keeps_the_einsum_program_off_gpu_and_with_a_soft_cap():
  cfg = models.get_model_config("tiny", attn_logit_softcap=5.0)
  params = _params(cfg)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  auto = _jaxpr(cfg.replace(attention_impl="auto"), params, tokens)
  assert auto == _jaxpr(cfg, params, tokens)
  assert "tanh" in auto  # the cap is applied
  plain = cfg.replace(attn_logit_softcap=0.0)
  if transformer._cuda_capability() is None:  # CPU / TPU: no cuDNN, the einsums
    assert _jaxpr(plain.replace(attention_impl="auto"), params, tokens) == _jaxpr(
      plain, params, tokens
    )
  # "fused" is a different program (the option is not a no-op).
  assert _jaxpr(plain.replace(attention_impl="fused"), params, tokens) != _jaxpr(
    plain, params, tokens
  )


def test_kernel_choice(monkeypatch):
  def kernel(t=8, s=8, **overrides):
    cfg = models.get_model_config("tiny", **{"dtype": "bfloat16", **overrides})
    q = jax.ShapeDtypeStruct((2, t, cfg.num_heads, cfg.head_size), cfg.dtype)
    k = jax.ShapeDtypeStruct((2, s, cfg.kv_heads, cfg.head_size), cfg.dtype)
    return transformer.attention_kernel(cfg, q, k)

  monkeypatch.setattr(transformer, "_cuda_capability", lambda: None)  # CPU, TPU, ROCm
  assert kernel(attention_impl="auto") == "xla"
  assert kernel(attention_impl="fused") == "jax"
  monkeypatch.setattr(transformer, "_cuda_capability", lambda: (9, 0))  # an H100
  assert kernel(attention_impl="xla") == "xla"
  assert kernel(attention_impl="auto") == kernel(attention_impl="fused") == "cudnn"
  assert kernel(attention_impl="auto", attn_logit_softcap=5.0) == "xla"
  # What cuDNN does not take: float32, odd lengths (one-token decoding), head_dim % 8.
  assert kernel(attention_impl="auto", dtype="float32") == "xla"
  assert kernel(attention_impl="fused", dtype="float32") == "jax"
  assert kernel(t=1, s=16, attention_impl="auto") == "xla"
  assert kernel(attention_impl="auto", head_dim=12) == "xla"
  assert kernel(attention_impl="auto", head_dim=256) == "cudnn"
  monkeypatch.setattr(transformer, "_cuda_capability", lambda: (8, 0))  # an A100
  assert kernel(attention_impl="auto", head_dim=256) == "xla"


def test_attention_impl_validation():
  with pytest.raises(ValueError, match=r"ModelConfig\.attention_impl='flash'"):
    models.ModelConfig(attention_impl="flash")
  with pytest.raises(ValueError, match=r"attention_impl='fused' cannot soft-cap"):
    models.ModelConfig(attention_impl="fused", attn_logit_softcap=50.0)
  models.ModelConfig(attention_impl="auto", attn_logit_softcap=50.0)  # falls back instead
  section = {"preset": "tiny", "attention_impl": "flash"}
  with pytest.raises(ConfigError, match=r"config\.model\.attention_impl='flash'"):
    models.CONFIG_SPEC.validate(section, "config.model")
  section = {"preset": "tiny", "attention_impl": "fused", "attn_logit_softcap": 50.0}
  with pytest.raises(ConfigError, match=r"config\.model: .*attention_impl='fused'"):
    models.CONFIG_SPEC.validate(section, "config.model")
  models.CONFIG_SPEC.validate({"preset": "tiny", "attention_impl": "fused"}, "config.model")
