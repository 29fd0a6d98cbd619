"""Hugging Face models in and out (rlhf_jax/hf), on the tiny checkpoints of tests/fixtures/hf.

The fixtures are random models that `transformers` wrote, with the logits it computed and
the tokens it decoded greedily after left-padded prompts (`reference.npz`): the importer
must reproduce both (the tokens with this framework's KV-cache sampler), the exporter must
write what `transformers` reads back to the same logits and what the importer reads back to
the same bits, and the tokenizer must encode as `transformers` does. Regenerate them with
`python tests/fixtures/hf/make_fixtures.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import errors, hf, models, sharding
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import weights
from rlhf_jax.hf.tokenizer import HfTokenizer
from rlhf_jax.rl import sampler

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
# Fixture folders of causal LMs (mistral_sw: a 4-token sliding window on every layer).
KINDS = ("gpt2", "llama", "mistral", "mistral_sw", "qwen2", "qwen3", "gemma2", "gemma3")
# Layers that differ (local and global, Gemma 3's RoPE bases) or a window on every layer.
WINDOWED = ("mistral_sw", "gemma2", "gemma3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL, GLOBAL = "sliding_attention", "full_attention"  # Gemma's layer types
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


def fixture(kind: str) -> str:
  return os.path.join(FIXTURES, kind)


def reference(kind: str):
  ref = np.load(os.path.join(fixture(kind), "reference.npz"))
  return ref["input_ids"], ref["logits"]


def logits_of(policy, input_ids) -> np.ndarray:
  out, _ = policy.module.apply({"params": policy.params}, jnp.asarray(input_ids))
  return np.asarray(out)


def load_with(kind: str, mesh, **overrides):
  """(module, params) of a fixture read with ModelConfig overrides (e.g. scan_layers)."""
  directory = fixture(kind)
  hf_cfg = hf_config.read(directory)
  cfg = hf_config.to_model_config(hf_cfg, **overrides)
  module = models.LanguageModel(cfg)
  boxed = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  shapes = sharding.unbox(boxed)
  shardings = sharding.tree_shardings(shapes, sharding.logical_specs(boxed), mesh, "fsdp")
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  return module, weights.load(directory, hf_cfg["model_type"], cfg, target)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, -1, 1))  # every parameter sharded over the fake devices


# ------------------------------------------------------------------------- config


def test_both_rope_spellings_give_the_same_config():
  """transformers 5 writes `rope_parameters`; Llama 3.x checkpoints in the wild carry the
  transformers 4 fields `rope_theta` and `rope_scaling`."""
  v5 = hf_config.read(fixture("llama"))
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  params = dict(v5["rope_parameters"])
  v4["rope_theta"] = params.pop("rope_theta")
  v4["rope_scaling"] = params
  a, b = hf_config.to_model_config(v5), hf_config.to_model_config(v4)
  assert a == b
  assert (a.rope_scaling, a.rope_factor, a.rope_original_max_len) == ("llama3", 8.0, 16)
  assert (a.num_kv_heads, a.head_dim, a.tie_embeddings) == (2, 8, False)


def test_gemma_configs_read_as_transformers_4_wrote_them():
  """Gemma 3 checkpoints from transformers 4 carry `rope_theta`, `rope_local_base_freq`,
  `rope_scaling` and `sliding_window_pattern` instead of per-layer-type `rope_parameters`
  and `layer_types`; Gemma 2 ones no `layer_types` (every other layer is local)."""
  v5 = hf_config.read(fixture("gemma3"))
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
  full = dict(v5["rope_parameters"][GLOBAL])
  local_theta = v5["rope_parameters"][LOCAL]["rope_theta"]
  v4.update(rope_theta=full.pop("rope_theta"), rope_scaling=full, rope_local_base_freq=local_theta)
  a, b = hf_config.to_model_config(v5), hf_config.to_model_config(v4)
  assert a == b
  assert (a.sliding_window, a.sliding_window_pattern) == (4, 3)
  assert a.local_layers() == (True, True, False, True)
  assert (a.rope_theta, a.rope_scaling, a.rope_factor) == (1e6, "linear", 2.0)
  assert a.rope_local_theta == 1e4
  assert (a.query_pre_attn_scalar, a.qk_norm, a.attn_logit_softcap) == (12.0, True, 0.0)
  g2 = hf_config.read(fixture("gemma2"))
  a = hf_config.to_model_config(g2)
  assert a == hf_config.to_model_config({k: v for k, v in g2.items() if k != "layer_types"})
  assert a.local_layers() == (True, False, True)
  assert (a.attn_logit_softcap, a.final_logit_softcap) == (2.0, 3.0)
  mistral = hf_config.to_model_config(hf_config.read(fixture("mistral_sw")))
  assert (mistral.sliding_window, mistral.local_layers()) == (4, (True, True))


@pytest.mark.parametrize(
  "kind, change, field",
  [
    ("llama", {"sliding_window": 4096}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "sliding_window"),
    ("llama", {"model_type": "gemma3"}, "model_type"),  # Gemma 3's multimodal models
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"layer_types": [LOCAL, GLOBAL, GLOBAL, LOCAL]}, "layer_types"),  # no pattern
    ("gemma3", {"layer_types": [LOCAL, GLOBAL, LOCAL, "chunked_attention"]}, "layer_types"),
    ("gemma3", {"layer_types": [LOCAL, GLOBAL]}, "layer_types"),  # 4 layers
    ("gemma3", {"sliding_window": None}, "sliding_window"),
    ("gemma3", {"rope_parameters": {GLOBAL: {}, LOCAL: LINEAR_ROPE}}, "rope_parameters"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"n_embd": None}, "n_embd"),
  ],
)
def test_a_setting_that_would_change_the_model_is_an_error_naming_it(kind, change, field):
  hf = {**hf_config.read(fixture(kind)), **change}
  with pytest.raises(errors.DataError) as raised:
    hf_config.to_model_config(hf, "x/config.json")
  assert raised.value.field == field
  assert str(raised.value).startswith("x/config.json: ")


@pytest.mark.parametrize("kind", KINDS)
def test_exported_config_reads_back_to_the_same_model(kind):
  hf_cfg = hf_config.read(fixture(kind))
  cfg = hf_config.to_model_config(hf_cfg)
  # A Mistral without a sliding window is a Llama.
  assert hf_config.architecture_of(cfg) == ("llama" if kind == "mistral" else hf_cfg["model_type"])
  back = hf_config.from_model_config(cfg, hf_config.architecture_of(cfg))
  assert hf_config.to_model_config(back) == cfg


# ----------------------------------------------------------------------- weights


@pytest.mark.parametrize("kind", KINDS)
def test_imported_model_reproduces_the_transformers_logits(kind, mesh):
  policy = hf.load_policy(f"hf:{fixture(kind)}", mesh)
  input_ids, expected = reference(kind)
  got = logits_of(policy, input_ids)
  np.testing.assert_allclose(got, expected, atol=5e-5 * np.abs(expected).max(), rtol=0)
  # The parameters are sharded as any trained policy's (fsdp over the 2 fake devices).
  assert len(policy.params["trunk"]["embedding"].sharding.device_set) == mesh.size


@pytest.mark.parametrize("kind", WINDOWED)
def test_unscanned_layers_give_the_same_logits(kind, mesh):
  """Per-layer windows and RoPE bases go to unrolled layers as they go to scanned ones."""
  module, params = load_with(kind, mesh, scan_layers=False)
  input_ids, expected = reference(kind)
  got, _ = module.apply({"params": params}, jnp.asarray(input_ids))
  np.testing.assert_allclose(np.asarray(got), expected, atol=5e-5 * np.abs(expected).max())


def test_the_fixtures_exercise_the_window_and_the_soft_caps(mesh):
  """mistral_sw is mistral's weights with a 4-token window: transformers' logits agree on
  the first 4 positions only. Without Gemma 2's soft-caps the logits move."""
  _, plain = reference("mistral")
  _, windowed = reference("mistral_sw")
  np.testing.assert_array_equal(plain[:, :4], windowed[:, :4])
  assert np.abs(plain[:, 4:] - windowed[:, 4:]).min(axis=-1).max() > 1e-3
  input_ids, expected = reference("gemma2")
  for cap in ("attn_logit_softcap", "final_logit_softcap"):
    module, params = load_with("gemma2", mesh, **{cap: 0.0})
    got, _ = module.apply({"params": params}, jnp.asarray(input_ids))
    assert np.abs(np.asarray(got) - expected).max() > 0.1, cap


@pytest.mark.parametrize(
  "kind, scan", [(kind, True) for kind in KINDS] + [(kind, False) for kind in WINDOWED]
)
def test_greedy_decoding_with_the_kv_cache_matches_transformers(kind, scan, mesh):
  """The sampler's prefill and cached decode steps, on the left-padded prompts of the
  fixture, pick the tokens transformers' `generate` picked (PAD after EOS)."""
  module, params = load_with(kind, mesh, scan_layers=scan)
  ref = np.load(os.path.join(fixture(kind), "reference.npz"))
  tok = HfTokenizer(fixture(kind), model_vocab_size=module.config.vocab_size)
  config = sampler.SamplerConfig(
    max_new_tokens=ref["greedy_ids"].shape[1], eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True
  )
  prompt = jnp.asarray(ref["prompt_ids"], jnp.int32)
  out = sampler.make_sampler(module, config)(params, prompt, ref["prompt_mask"], jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy_ids"])
  assert len(set(ref["prompt_mask"].sum(1))) == len(prompt)  # prompts of different lengths


@pytest.mark.parametrize("kind", (*KINDS, "qwen2_rm"))
def test_import_export_import_is_bit_exact(kind, tmp_path, mesh):
  """Export writes the imported parameters as they are (Gemma's zero-centred norm weights
  included), so reading the export back gives the same config and the same bits."""
  out = str(tmp_path / "out")
  if kind.endswith("_rm"):
    first = hf.load_reward_model(f"hf:{fixture(kind)}", mesh)
    hf.export_reward_model(first, out)
    back = hf.load_reward_model(f"hf:{out}", mesh)
  else:
    first = hf.load_policy(f"hf:{fixture(kind)}", mesh)
    hf.export_policy(first.params, first.module.config, first.tokenizer, out)
    back = hf.load_policy(f"hf:{out}", mesh)
  assert back.module.config == first.module.config
  assert jax.tree.structure(back.params) == jax.tree.structure(first.params)
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(back.params), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_unscanned_layers_and_bfloat16_params_read_the_same_checkpoint(mesh):
  directory = fixture("llama")
  hf_cfg = hf_config.read(directory)
  input_ids, expected = reference("llama")
  for overrides in ({"scan_layers": False}, {"param_dtype": "bfloat16"}):
    cfg = hf_config.to_model_config(hf_cfg, **overrides)
    module = models.LanguageModel(cfg)
    boxed = jax.eval_shape(lambda module=module: models.init_params(module, jax.random.key(0)))
    shapes = sharding.unbox(boxed)
    shardings = sharding.tree_shardings(shapes, sharding.logical_specs(boxed), mesh, "fsdp")
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    params = weights.load(directory, "llama", cfg, target)
    got, _ = module.apply({"params": params}, jnp.asarray(input_ids))
    # The checkpoint is stored in bfloat16: its values are exact in either param dtype.
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4 * np.abs(expected).max())


def _rewrite_weights(directory: str, change) -> None:
  """Applies `change(tensors) -> tensors` to a single-file fixture copy."""
  from safetensors.flax import load_file, save_file

  path = os.path.join(directory, "model.safetensors")
  save_file(change(dict(load_file(path))), path, metadata={"format": "pt"})


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": jnp.ones(8)},
     "tensor 'model.layers.0.self_attn.q_norm.weight' is not supported"),
    (lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"},
     "tensor 'model.norm.weight' is missing"),
    (lambda t: {**t, "model.norm.weight": jnp.ones(7)},
     "tensor 'model.norm.weight' has shape (7,); config.json implies (32,)"),
  ],
)  # fmt: skip
def test_a_tensor_that_does_not_fit_is_an_error_naming_it(change, message, tmp_path, mesh):
  directory = str(tmp_path / "qwen2")
  shutil.copytree(fixture("qwen2"), directory)
  _rewrite_weights(directory, change)
  with pytest.raises(errors.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
    hf.load_policy(f"hf:{directory}", mesh)


def test_check_names_what_is_wrong_with_an_hf_directory(tmp_path):
  assert hf.check(f"hf:{fixture('llama')}") is None
  assert hf.check(f"hf:{tmp_path / 'none'}") == "no such directory"
  shutil.copytree(fixture("gpt2"), tmp_path / "g")
  with open(tmp_path / "g" / "config.json") as f:
    cfg = json.load(f)
  with open(tmp_path / "g" / "config.json", "w") as f:
    json.dump({**cfg, "model_type": "gemma3"}, f)
  assert "model_type 'gemma3' is not supported" in hf.check(f"hf:{tmp_path / 'g'}")


# --------------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_and_decodes_as_transformers():
  transformers = pytest.importorskip("transformers")
  ours = HfTokenizer(fixture("llama"), model_vocab_size=384)
  theirs = transformers.AutoTokenizer.from_pretrained(fixture("llama"))
  texts = ["Review of the lamp: it glows.", "Hello  world!\nNumbers 42", "ünïcödé ✓"]
  for text in texts:
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_bos=True, add_eos=True) == [0, *ids, 1]
    assert ours.decode(ids) == text
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)
  # Decoding stops at EOS and drops padding and ids past the tokenizer.
  ids = ours.encode(texts[0])
  assert ours.decode([2, 2, *ids, 383 + 1, 1, 5, 6]) == texts[0]
  assert ours.decode_batch([ids, ids[:3]]) == [texts[0], ours.decode(ids[:3])]


def test_a_tokenizer_without_pad_pads_past_its_ids_or_says_so(tmp_path):
  shutil.copytree(fixture("qwen2"), tmp_path / "t")
  path = tmp_path / "t" / "tokenizer_config.json"
  with open(path) as f:
    cfg = json.load(f)
  cfg.pop("pad_token")
  with open(path, "w") as f:
    json.dump(cfg, f)
  tok = HfTokenizer(str(tmp_path / "t"), model_vocab_size=400)
  assert tok.pad_id == tok.vocab_size == 384 and tok.pad_id != tok.eos_id
  with pytest.raises(errors.DataError) as raised:
    HfTokenizer(str(tmp_path / "t"), model_vocab_size=384)
  assert raised.value.field == "pad_token"


# ------------------------------------------------------------------------ export


@pytest.mark.parametrize("kind, dtype", [("gpt2", "float32"), ("qwen2", "float32"),
                                         ("qwen3", "float32"), ("llama", "bfloat16"),
                                         ("mistral_sw", "float32"), ("gemma2", "float32"),
                                         ("gemma3", "float32")])  # fmt: skip
def test_export_is_what_transformers_loads_with_the_same_logits(kind, dtype, tmp_path, mesh):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  policy = hf.load_policy(f"hf:{fixture(kind)}", mesh)
  out = str(tmp_path / "out")
  assert (
    hf.export_policy(policy.params, policy.module.config, policy.tokenizer, out, dtype=dtype)
    == hf_config.read(fixture(kind))["model_type"]
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  input_ids, expected = reference(kind)
  with torch.no_grad():
    got = model(torch.tensor(input_ids)).logits.numpy()
  # The llama fixture is stored in bfloat16, so a bfloat16 export loses nothing.
  np.testing.assert_allclose(got, expected, atol=5e-5 * np.abs(expected).max(), rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token_id == policy.tokenizer.eos_id


# ------------------------------------------------------------------ reward models


def test_imported_reward_model_scores_as_the_classifier(mesh):
  rm = hf.load_reward_model(f"hf:{fixture('qwen2_rm')}", mesh)
  input_ids, expected = reference("qwen2_rm")
  scores, spread = rm.score(jnp.asarray(input_ids), jnp.ones(input_ids.shape, bool))
  np.testing.assert_allclose(np.asarray(scores), expected[:, 0], atol=1e-5)
  assert rm.ensemble_size == 1 and float(np.max(np.abs(np.asarray(spread)))) == 0.0
  # A causal LM is not a reward model, and the reverse; both are named.
  assert "not a reward model" in hf.check(f"hf:{fixture('qwen2')}", "reward")
  assert "holds a sequence classifier" in hf.check(f"hf:{fixture('qwen2_rm')}", "policy")
  with pytest.raises(errors.StageError, match="is not a reward model"):
    hf.load_reward_model(f"hf:{fixture('qwen2')}", mesh)


def test_reward_model_export_is_a_classifier_with_the_same_scores(tmp_path, mesh):
  """The normalised score, up to the constant config.json keeps (a classifier's score has
  no bias); `reward_init=hf:` reads it back whole."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  rm = hf.load_reward_model(f"hf:{fixture('qwen2_rm')}", mesh)
  rm.gain, rm.bias = 2.0, -0.5  # as a reward stage's normalisation would set them
  input_ids, expected = reference("qwen2_rm")
  out = str(tmp_path / "rm")
  assert hf.export_reward_model(rm, out) == "qwen2"
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
  with torch.no_grad():
    got = model(torch.tensor(input_ids)).logits.numpy()[:, 0]
  with open(os.path.join(out, "config.json")) as f:
    offset = json.load(f)[hf_config.SCORE_OFFSET]
  np.testing.assert_allclose(got + offset, 2.0 * expected[:, 0] - 0.5, atol=1e-4)
  back = hf.load_reward_model(f"hf:{out}", mesh)
  scores, _ = back.score(jnp.asarray(input_ids), jnp.ones(input_ids.shape, bool))
  np.testing.assert_allclose(np.asarray(scores), 2.0 * expected[:, 0] - 0.5, atol=1e-4)


# ------------------------------------------------------------------- end to end


def test_sft_reward_and_ppo_from_hf_models_then_export(tmp_path):
  """SFT starts from `hf:DIR` (its weights and tokenizer, chat records rendered with its
  template), the reward model is fine-tuned from a published one (`reward_init=hf:DIR`) on
  preference files, PPO continues from the SFT stage against it, and `experiments.export`
  writes the PPO policy as a directory transformers loads, with the trained weights."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rlhf_jax import config_utils, stages

  sft_dir, rm_dir, ppo_dir, out = (str(tmp_path / n) for n in ("sft", "rm", "ppo", "hf"))
  examples = os.path.join(REPO, "docs", "examples", "own_data")
  sft = config_utils.load_config(os.path.join(REPO, "configs/sft.py:runlocal"))
  sft.update(policy_init=f"hf:{fixture('qwen2')}", total_steps=4, eval_every=4, log_every=2,
             checkpoint_every=4, batch_size=8)  # fmt: skip
  sft.data.update(source="jsonl", train_jsonl=os.path.join(examples, "sft.jsonl"))
  sft.optim.warmup_steps = 1
  sft.eval.num_samples = 0
  config_utils.run(sft, sft_dir)
  assert os.path.exists(os.path.join(sft_dir, "tokenizer", "tokenizer.json"))
  rm = config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))
  rm.update(policy_init=sft_dir, reward_init=f"hf:{fixture('qwen2_rm')}", ensemble_size=1,
            max_len=64, total_steps=2, eval_every=2, checkpoint_every=2, log_every=1,
            batch_size=8, normalize_samples=16)  # fmt: skip
  prefs = (os.path.join(examples, "prefs.jsonl"),)
  rm.data.update(source="jsonl", train_files=prefs, responses_per_prompt=3, prompt_len=48,
                 max_new_tokens=8, sample_batch=16)  # fmt: skip
  rm.optim.warmup_steps = 1
  config_utils.run(rm, rm_dir)
  ppo = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  ppo.update(policy_init=sft_dir, reward_init=rm_dir, prompt_len=40,
             total_steps=1, rollout_batch_size=8, minibatch_size=8,
             value_model="policy_head")  # fmt: skip
  ppo.data.update(source="jsonl", prompts=os.path.join(examples, "prompts.jsonl"))
  ppo.eval.num_prompts = 4
  config_utils.run(ppo, ppo_dir)
  with open(os.path.join(ppo_dir, "summary.json")) as f:
    assert json.load(f)["evaluator"] == "proxy"  # no gold: the reward model judges
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  export = [sys.executable, "-m", "experiments.export", f"--workdir={ppo_dir}", f"--out={out}"]
  proc = subprocess.run(export, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Wrote a Hugging Face qwen2 model" in proc.stdout
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  input_ids, before = reference("qwen2")
  with torch.no_grad():
    after = model(torch.tensor(input_ids)).logits.numpy()
  assert np.abs(after - before).max() > 1e-2  # trained, not the starting weights
  policy = stages.load_policy(ppo_dir, sharding.make_mesh((1, -1, 1)))
  np.testing.assert_allclose(after, logits_of(policy, input_ids), atol=1e-4, rtol=0)


def test_every_checkpoint_tensor_is_read_once(monkeypatch, mesh):
  """Shards of one parameter (the fake devices split every layer's tensor) share one read."""
  counts: dict[str, int] = {}
  get = weights.Reader.get

  def counting(self, name):
    counts[name] = counts.get(name, 0) + 1
    return get(self, name)

  monkeypatch.setattr(weights.Reader, "get", counting)
  policy = hf.load_policy(f"hf:{fixture('llama')}", mesh)
  assert len(policy.params["trunk"]["layers"]["attn"]["q"].sharding.device_set) == mesh.size
  assert counts and set(counts.values()) == {1}, {k: v for k, v in counts.items() if v > 1}
