"""Tests for the transformer: layouts, equivalences, cached decoding, heads."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import transformer

STYLES = {
  "llama": dict(),  # the "tiny" preset: RoPE, RMSNorm, SwiGLU, GQA 4/2, tied
  "gpt2": dict(name="tiny-gpt2"),
  # Every optional feature at once: untied head, GeGLU, embedding scale, q/k/v biases,
  # per-head q/k norms (Qwen3).
  "untied": dict(tie_embeddings=False, mlp="geglu", embed_scale=True, qkv_bias=True, qk_norm=True),
  # Gemma 2/3: zero-centred and post norms, soft-caps, a local layer (3-token window, its own
  # RoPE base) then a global one.
  "gemma": dict(
    mlp="geglu",
    embed_scale=True,
    qk_norm=True,
    zero_centered_norm=True,
    post_norms=True,
    query_pre_attn_scalar=24.0,
    attn_logit_softcap=5.0,
    final_logit_softcap=10.0,
    sliding_window=3,
    sliding_window_pattern=2,
    rope_local_theta=1000.0,
  ),
}


def _config(style="llama", **overrides):
  kw = dict(STYLES[style])
  name = kw.pop("name", "tiny")
  return models.get_model_config(name, **{**kw, **overrides})


def _jit_apply(module):
  """`module.apply` compiled as one program: op-by-op (eager) dispatch of a whole model
  compiles every op on its own, ~10x slower in a test than one jit."""
  return jax.jit(module.apply)


def _init(module, seed=0):
  return meta.unbox(models.init_params(module, jax.random.key(seed)))


def _left_padded(prompts, length):
  tokens = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p) :] = p
    mask[i, length - len(p) :] = True
  return tokens, mask


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("scan", [True, False])
def test_param_count_matches_analytic(style, scan):
  cfg = _config(style, scan_layers=scan)
  params = _init(models.LanguageModel(cfg))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_parameter_has_logical_axes(style):
  boxed = models.init_params(models.LanguageModel(_config(style)), jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, meta.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
  names = {n for leaf in leaves for n in leaf.names}
  assert {"embed", "vocab", "heads", "kv_heads", "mlp", "layers"} <= names


def _unstack_layers(params, num_layers):
  """Scanned params {"layers": [L, ...]} -> unscanned {"layer_i": ...}."""
  trunk = dict(params["trunk"])
  stacked = trunk.pop("layers")
  for i in range(num_layers):
    trunk[f"layer_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return {**params, "trunk": trunk}


@pytest.mark.parametrize("style", ["llama", "gpt2", "gemma"])
def test_scan_and_unrolled_layers_agree(style):
  cfg = _config(style)
  params = _init(models.LanguageModel(cfg))
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
  scanned, _ = models.LanguageModel(cfg).apply({"params": params}, tokens)
  unrolled, _ = models.LanguageModel(cfg.replace(scan_layers=False)).apply(
    {"params": _unstack_layers(params, cfg.num_layers)}, tokens
  )
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_loss_and_gradients(remat):
  cfg = _config()
  params = _init(models.LanguageModel(cfg))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

  def loss(p, c):
    logits, _ = models.LanguageModel(c).apply({"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref = value_and_grad(params, cfg)
  got = value_and_grad(params, cfg.replace(remat=remat))
  np.testing.assert_allclose(ref[0], got[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), ref[1], got[1])


def test_bfloat16_compute_and_params():
  cfg = _config(dtype="bfloat16", param_dtype="bfloat16")
  module = models.LanguageModel(cfg)
  params = _init(module)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  tokens = jnp.arange(10).reshape(2, 5)
  logits, _ = module.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  ref, _ = models.LanguageModel(_config()).apply(
    {"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)}, tokens
  )
  # bf16 has ~3 significant digits; the logits must still track float32.
  assert np.corrcoef(np.ravel(logits), np.ravel(ref))[0, 1] > 0.99


@pytest.mark.parametrize("style", sorted(STYLES))
def test_left_padding_does_not_change_logits(style):
  cfg = _config(style)
  module = models.LanguageModel(cfg)
  params = _init(module)
  prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
  tokens, mask = _left_padded(prompts, 7)
  apply = _jit_apply(module)
  logits, _ = apply(
    {"params": params},
    tokens,
    models.positions_from_mask(mask),
    models.causal_attention_mask(mask),
  )
  assert np.all(np.isfinite(logits))
  for i, p in enumerate(prompts):
    alone, _ = apply({"params": params}, jnp.array([p]))
    np.testing.assert_allclose(logits[i, 7 - len(p) :], alone[0], atol=2e-5, rtol=1e-5)


def test_rope_logits_invariant_to_position_shift():
  """RoPE attends by relative position, so a constant offset changes nothing."""
  cfg = _config()
  module = models.LanguageModel(cfg)
  params = _init(module)
  tokens = jnp.arange(3, 9)[None]
  base = jnp.arange(6)[None]
  a, _ = module.apply({"params": params}, tokens, base)
  b, _ = module.apply({"params": params}, tokens, base + 37)
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  # ...but a learned position table is absolute.
  gcfg = _config("gpt2")
  gmodule = models.LanguageModel(gcfg)
  gparams = _init(gmodule)
  c, _ = gmodule.apply({"params": gparams}, tokens, base)
  d, _ = gmodule.apply({"params": gparams}, tokens, base + 37)
  assert np.abs(c - d).max() > 1e-3


def test_grouped_query_attention_matches_repeated_kv_heads():
  """GQA == MHA whose kv head j is repeated for query heads j*G..j*G+G-1 (HF repeat_kv)."""
  gqa = _config(num_heads=4, num_kv_heads=2)
  mha = gqa.replace(num_kv_heads=4)
  params = _init(models.LanguageModel(gqa))
  layers = dict(params["trunk"]["layers"])
  attn = dict(layers["attn"])
  for name in ("k", "v"):
    attn[name] = jnp.repeat(attn[name], 2, axis=2)  # [L, D, K, H] -> [L, D, N, H]
  layers["attn"] = attn
  mha_params = {**params, "trunk": {**params["trunk"], "layers": layers}}
  tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, gqa.vocab_size)
  a, _ = models.LanguageModel(gqa).apply({"params": params}, tokens)
  b, _ = models.LanguageModel(mha).apply({"params": mha_params}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_matches_full_forward(style, scan):
  """Prefill a left-padded prompt, then feed tokens one at a time through the cache."""
  cfg = _config(style, scan_layers=scan)
  module = models.LanguageModel(cfg)
  params = _init(module)
  prompts = [[5, 6, 7, 8], [10, 11]]
  p, n = 5, 6
  prompt, pmask = _left_padded(prompts, p)
  cont = np.asarray(jax.random.randint(jax.random.key(3), (2, n), 4, cfg.vocab_size))
  full = np.concatenate([prompt, cont], 1)
  fmask = np.concatenate([pmask, np.ones((2, n), bool)], 1)
  ref, _ = _jit_apply(module)(
    {"params": params}, full, models.positions_from_mask(fmask), models.causal_attention_mask(fmask)
  )

  s = p + n
  cache = models.init_cache(cfg, 2, s)
  key_mask = np.concatenate([pmask, np.zeros((2, n), bool)], 1)
  attn = (np.arange(s)[None, :] <= np.arange(p)[:, None])[None] & key_mask[:, None, :]
  logits, cache = _jit_apply(module)(
    {"params": params}, prompt, models.positions_from_mask(pmask), attn, cache, 0
  )
  got = [logits]
  positions = pmask.sum(1)
  step = jax.jit(lambda c, tok, pos, m, i: module.apply({"params": params}, tok, pos, m, c, i))
  for t in range(n - 1):
    slot = p + t
    key_mask[:, slot] = True
    row = (np.arange(s)[None, :] <= slot) & key_mask
    logits, cache = step(cache, cont[:, t : t + 1], (positions + t)[:, None], row[:, None], slot)
    got.append(logits)
  got = np.concatenate(got, 1)
  # Compare at real tokens only (left-pad rows are never read).
  real = fmask[:, : p + n - 1]
  np.testing.assert_allclose(got[real], np.asarray(ref)[:, : p + n - 1][real], atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", [0, 2])
def test_a_query_sees_the_sliding_window_and_its_own_token(pattern):
  """With a window of 3, position t attends to t-2, t-1 and t (transformers' convention):
  in a one-layer model, changing the token at t-3 leaves t's logits as they are, changing
  the one at t-2 does not. In a global layer (pattern 2: layer 1) it does."""
  cfg = _config(num_layers=2 if pattern else 1, sliding_window=3, sliding_window_pattern=pattern)
  module = models.LanguageModel(cfg)
  params = _init(module)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 8), 4, cfg.vocab_size))
  base, _ = module.apply({"params": params}, tokens)

  def changed_at(j):
    other = tokens.copy()
    other[0, j] = 3
    out, _ = module.apply({"params": params}, other)
    return np.abs(np.asarray(out - base))[0, 7].max()

  assert changed_at(6) > 1e-3
  assert changed_at(5) > 1e-3
  if pattern:  # a global layer above the local one: nothing is out of reach
    assert changed_at(4) > 1e-3
  else:
    assert changed_at(4) == 0.0
    assert changed_at(0) == 0.0


def test_per_layer_settings_only_when_layers_differ():
  assert transformer.layer_inputs(_config()) is None
  assert transformer.layer_inputs(_config(sliding_window=4)) is None  # all local
  gemma = _config("gemma", num_layers=4)
  assert gemma.local_layers() == (True, False, True, False)
  per_layer = transformer.layer_inputs(gemma)
  np.testing.assert_array_equal(per_layer["window"][::2], 3)
  assert per_layer["inv_freq"].shape == (4, gemma.head_size // 2)
  np.testing.assert_allclose(
    per_layer["inv_freq"][1], transformer.rope_inv_freq(gemma), rtol=0, atol=0
  )
  assert float(per_layer["inv_freq"][0, 1]) > float(per_layer["inv_freq"][1, 1])  # base 1000
  assert gemma.replace(sliding_window_pattern=5).local_layers() == (True,) * 4
  assert gemma.replace(sliding_window=0).local_layers() == (False,) * 4


def test_scalar_heads():
  cfg = _config(d_model=256, mlp_dim=256, num_heads=4)
  reward = models.reward_model(cfg)
  rparams = _init(reward)
  kernel = rparams["head"]["kernel"]
  # docs/rlhf_details.md: N(0, 1/sqrt(d_model + 1)), bias 0.
  assert abs(float(jnp.std(kernel)) - 1 / np.sqrt(cfg.d_model + 1)) < 0.015
  assert float(rparams["head"]["bias"]) == 0.0
  tokens = jnp.arange(12).reshape(2, 6)
  scores = reward.apply({"params": rparams}, tokens)
  assert scores.shape == (2, 6) and scores.dtype == jnp.float32
  assert float(jnp.std(scores)) > 0.0

  value = models.value_model(cfg)
  vparams = _init(value)
  np.testing.assert_array_equal(value.apply({"params": vparams}, tokens), 0.0)
  # Same layout: a value network can start from the reward model's weights.
  assert jax.tree.structure(vparams) == jax.tree.structure(rparams)
  np.testing.assert_allclose(value.apply({"params": rparams}, tokens), scores)

  policy = models.LanguageModel(cfg, value_head=True)
  pparams = _init(policy)
  logits, _, values = policy.apply({"params": pparams}, tokens)
  assert logits.shape == (2, 6, cfg.vocab_size)
  np.testing.assert_array_equal(values, 0.0)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="position"):
    models.ModelConfig(position="alibi")
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="Unknown model preset"):
    models.get_model_config("gpt5")
  with pytest.raises(ValueError, match="d_modle"):
    models.get_model_config("tiny", d_modle=3)
  with pytest.raises(ValueError, match="zero_centered_norm"):
    models.get_model_config("tiny-gpt2", zero_centered_norm=True)
  with pytest.raises(ValueError, match="sliding_window=-1"):
    models.ModelConfig(sliding_window=-1)


def test_the_model_section_declares_every_field():
  fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
  assert fields == set(models.CONFIG_SPEC.fields) - {"preset"}
  gemma = {"preset": "tiny", **STYLES["gemma"]}
  models.CONFIG_SPEC.validate(gemma, "config.model")
  with pytest.raises(ConfigError, match=r"config\.model\.sliding_window=-2"):
    models.CONFIG_SPEC.validate({**gemma, "sliding_window": -2}, "config.model")
  with pytest.raises(ConfigError, match="zero_centered_norm"):  # the cross-field check
    models.CONFIG_SPEC.validate({**gemma, "norm": "layernorm"}, "config.model")


def test_published_presets_have_published_sizes():
  # Parameter counts as published (embeddings included).
  assert models.get_model_config("gpt2-small").num_params() == 124_439_808
  assert models.get_model_config("gpt2-medium").num_params() == 354_823_168
  assert models.get_model_config("llama3.2-1b").num_params() == 1_235_814_400
  assert models.get_model_config("qwen2.5-0.5b").num_params() == 494_032_768


def test_flop_counts():
  cfg = _config()
  per_token = cfg.train_flops_per_token(seq_len=16)
  assert per_token == 6 * cfg.matmul_params() + 12 * cfg.num_layers * 16 * 4 * 16
  # Forward-only decode is about a third of training at the same context.
  ratio = cfg.decode_flops_per_token(16) / per_token
  assert abs(ratio - 1 / 3) < 1e-9


def test_positions_and_masks():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(
    models.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
  )
  m = transformer.causal_attention_mask(mask)
  assert m.shape == (2, 5, 5)
  assert not m[0, 4, 1] and m[0, 4, 2] and not m[0, 2, 3]
  assert m[1].sum() == 15


def test_positions_restart_and_attention_stays_within_each_segment():
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(
    models.positions_from_segments(segments), [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
  )
  m = models.segment_attention_mask(segments)
  assert m.shape == (2, 8, 8)
  assert m[0, 4, 3] and m[0, 4, 4] and not m[0, 4, 2] and not m[0, 3, 4]  # causal, own segment
  assert not m[0, 6].any() and not m[0, :, 6].any()  # padding attends and is attended by nothing
  # One example per row: the mask and positions of the plain (mask-based) helpers.
  mask = segments[1] != 0
  np.testing.assert_array_equal(m[1][mask], models.causal_attention_mask(mask[None])[0][mask])
  np.testing.assert_array_equal(
    models.positions_from_segments(segments[1:]), models.positions_from_mask(mask[None])
  )


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_packed_examples_do_not_see_each_other(style):
  """An example's logits in a packed row are those it has alone, whatever its neighbours hold
  (a sliding window too: it counts slots, and an example's slots are contiguous).

  RoPE here; learned positions are covered by tests/data/test_packing.py's loss test.
  """
  cfg = _config(style)
  module = models.LanguageModel(cfg)
  params = _init(module)
  rng = np.random.default_rng(0)
  a, b = rng.integers(4, cfg.vocab_size, 5), rng.integers(4, cfg.vocab_size, 4)

  @jax.jit
  def logits(tokens, segments):
    out, _ = module.apply(
      {"params": params},
      tokens,
      models.positions_from_segments(segments),
      models.segment_attention_mask(segments),
    )
    return out

  packed = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 4 + [0] * 8], jnp.int32)
  rows = lambda first: jnp.array([[*first, *b, 0, 0, 0], [*b] + [0] * 8], jnp.int32)
  out = logits(rows(a), packed)
  other = logits(rows(rng.integers(4, cfg.vocab_size, 5)), packed)
  assert not np.allclose(out[0, :5], other[0, :5])  # the first example changed ...
  np.testing.assert_array_equal(out[0, 5:9], other[0, 5:9])  # ... the second did not see it
  np.testing.assert_allclose(out[0, 5:9], out[1, :4], atol=1e-5)  # and is as if alone


@pytest.mark.parametrize("style", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("scan", [True, False])
def test_grown_trunk_starts_as_the_base_and_its_new_layers_train(style, scan):
  base_cfg = _config(style, scan_layers=scan)
  deep_cfg = base_cfg.replace(num_layers=base_cfg.num_layers + 2)
  base = _init(models.ScalarModel(base_cfg), seed=1)
  deep = models.ScalarModel(deep_cfg)
  fresh = _init(deep, seed=2)
  params = {**fresh, "trunk": models.grow_trunk(fresh["trunk"], base["trunk"], 2, scan)}
  params["head"] = base["head"]
  shapes = jax.tree.map(jnp.shape, fresh)
  assert jax.tree.map(jnp.shape, params) == shapes
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 200, (2, 9)), jnp.int32)
  # Identity-initialised blocks on top: the grown model computes what the base computes.
  np.testing.assert_allclose(
    _jit_apply(deep)({"params": params}, tokens),
    _jit_apply(models.ScalarModel(base_cfg))({"params": base}, tokens),
    rtol=1e-5,
    atol=1e-6,
  )
  # The new blocks are not stuck at the identity: their branch ends get gradients.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(deep.apply({"params": p}, tokens) ** 2)))(params)
  trunk = grads["trunk"]
  top = (
    jax.tree.map(lambda g: g[2:], trunk["layers"])
    if scan
    else {k: trunk[k] for k in ("layer_2", "layer_3")}
  )
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(top))
  if scan:
    np.testing.assert_array_equal(
      params["trunk"]["layers"]["attn"]["q"][2:], fresh["trunk"]["layers"]["attn"]["q"][2:]
    )
    assert not np.any(params["trunk"]["layers"]["attn"]["o"][2:])


def test_causal_blocks_cover_the_row_once():
  assert transformer.causal_blocks(63) == [(0, 63)]
  assert transformer.causal_blocks(100) == [(0, 32), (32, 64), (64, 96), (96, 100)]
  assert transformer.causal_blocks(256) == [(a, a + 64) for a in range(0, 256, 64)]
  assert len(transformer.causal_blocks(4096)) == 8
  for t in (64, 97, 130, 1000):
    blocks = transformer.causal_blocks(t)
    assert blocks[0][0] == 0 and blocks[-1][1] == t
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_attention_in_causal_blocks_matches_one_block(style, monkeypatch):
  """A full pass computes each query block against the keys up to its end: logits at real
  tokens and gradients equal the whole T x T computation (GQA; soft-cap and window for
  gemma), with left padding and two packed examples in a row."""
  cfg = _config(style)
  module = models.LanguageModel(cfg)
  params = _init(module)
  t = 100  # blocks of 32, the last one of 4
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, cfg.vocab_size, (2, t)).astype(np.int32)
  segments = np.zeros((2, t), np.int32)
  segments[0, 9:] = 1  # left padding
  segments[1, :45], segments[1, 45:90] = 1, 2  # two packed examples, then padding
  positions = models.positions_from_segments(segments)
  mask = models.segment_attention_mask(segments)
  real = segments > 0

  def loss(p):
    logits, _ = module.apply({"params": p}, tokens, positions, mask)
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)), logits

  (got, got_logits), got_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  monkeypatch.setattr(transformer, "causal_blocks", lambda t: [(0, t)])
  (want, want_logits), want_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(want_logits)[real], atol=2e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)  # summation order only


@pytest.mark.parametrize("value_head", [False, True])
def test_logits_window_is_the_slice_of_every_position_logits(value_head):
  """The LM head on a window of positions (a response's) gives those positions' logits and
  gradients; values stay per position."""
  cfg = _config("untied")
  module = models.LanguageModel(cfg, value_head=value_head)
  params = _init(module)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 4, cfg.vocab_size))

  def head(p, window):
    out = module.apply({"params": p}, tokens, logits_window=window)
    logits = out[0] if window is not None else out[0][:, 4:11]
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5]), out

  (got, got_out), got_grads = jax.value_and_grad(head, has_aux=True)(params, (4, 11))
  (want, want_out), want_grads = jax.value_and_grad(head, has_aux=True)(params, None)
  assert got_out[0].shape == (2, 7, cfg.vocab_size)
  np.testing.assert_allclose(got_out[0], want_out[0][:, 4:11], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if value_head:
    assert got_out[2].shape == (2, 12)
  last = module.apply({"params": params}, tokens, last_only=True)[0]
  np.testing.assert_allclose(last, want_out[0][:, -1:], rtol=1e-6, atol=1e-6)
  at = np.array([[4, 10, 5], [0, 11, 11]])  # any positions per row, repeats allowed
  picked = module.apply({"params": params}, tokens, logits_at=at)[0]
  np.testing.assert_allclose(
    picked, np.take_along_axis(np.asarray(want_out[0]), at[..., None], 1), rtol=1e-6, atol=1e-6
  )
