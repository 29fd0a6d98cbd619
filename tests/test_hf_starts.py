"""Stages starting from Hugging Face models: the reward model (`config.reward_init=hf:DIR`: a
causal LM's trunk with fresh heads, or a one-label classifier's trunk and head), PPO's
critic (`config.value_init`), and SFT with the model section's compute fields."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import config_utils, errors, hf, sharding, stages
from rlhf_jax.trainers import reward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
EXAMPLES = os.path.join(REPO, "docs", "examples", "own_data")


def config_for(reward_init: str, **changes):
  config = config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))
  config.policy_init = f"hf:{FIXTURES}/qwen2"
  config.reward_init = reward_init
  config.update(changes)
  return config


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh((1, -1, 1))
  return mesh, hf.load_policy(f"hf:{FIXTURES}/qwen2", mesh)


def test_a_classifier_brings_its_trunk_and_head(setup):
  mesh, policy = setup
  config = config_for(f"hf:{FIXTURES}/qwen2_rm", ensemble_size=1)
  cfg, trunk, head, _ = reward.start_params(config, policy, mesh, "fsdp")
  rm = hf.load_reward_model(f"hf:{FIXTURES}/qwen2_rm", mesh)
  assert cfg == rm.module.config
  expected = jax.tree.map(lambda x: np.asarray(x[0]), rm.params)
  jax.tree.map(np.testing.assert_array_equal, (trunk, head), (expected["trunk"], expected["head"]))
  # Every member would be the same classifier: an ensemble of them is refused.
  with pytest.raises(
    errors.ConfigError, match=r"config\.ensemble_size=2 with a sequence classifier"
  ):
    reward.start_params(config_for(config.reward_init), policy, mesh, "fsdp")


def test_a_causal_lm_brings_its_trunk_and_fresh_heads(setup):
  mesh, policy = setup
  cfg, trunk, head, _ = reward.start_params(
    config_for(f"hf:{FIXTURES}/qwen3"), policy, mesh, "fsdp"
  )
  other = hf.load_policy(f"hf:{FIXTURES}/qwen3", mesh)
  assert head is None and cfg == other.module.config and cfg.qk_norm  # Qwen3's, not the policy's
  jax.tree.map(np.testing.assert_array_equal, trunk, other.params["trunk"])
  # Without reward_init: the policy's own trunk.
  cfg, trunk, head, _ = reward.start_params(config_for(""), policy, mesh, "fsdp")
  assert head is None and cfg == policy.module.config and trunk is policy.params["trunk"]


def test_a_model_with_another_tokenizer_is_refused(setup, tmp_path):
  mesh, policy = setup
  other = tmp_path / "qwen3"
  shutil.copytree(os.path.join(FIXTURES, "qwen3"), other)
  with open(other / "tokenizer.json") as f:
    data = json.load(f)
  data["model"]["vocab"] = {k + "x": v for k, v in data["model"]["vocab"].items()}
  with open(other / "tokenizer.json", "w") as f:
    json.dump(data, f)
  with pytest.raises(errors.ConfigError, match=r"tokenizer\.json differs from the policy's"):
    reward.start_params(config_for(f"hf:{other}"), policy, mesh, "fsdp")


def test_reward_init_is_checked_with_the_config():
  for value, message in (
    ("runs/rm", "no such directory"),
    ("hf:/nonexistent", "no such directory"),
  ):
    with pytest.raises(errors.ConfigError, match=f"reward_init='{value}': {message}"):
      reward.CONFIG_SPEC.validate(config_for(value))


@pytest.mark.slow
def test_fine_tuning_a_published_reward_model_on_chat_preferences(tmp_path):
  """policy_init and reward_init both Hugging Face models; preference records with chat
  prompts rendered by the tokenizer's template; the export scores as a reward stage."""
  config = config_for(f"hf:{FIXTURES}/qwen2_rm", ensemble_size=1, max_len=64)
  files = (os.path.join(EXAMPLES, "prefs.jsonl"),)
  config.data.update(source="jsonl", train_files=files, responses_per_prompt=3, prompt_len=48,
                     max_new_tokens=8, sample_batch=16)  # fmt: skip
  config.update(total_steps=2, eval_every=2, checkpoint_every=2, log_every=1, batch_size=8)
  config.optim.warmup_steps, config.normalize_samples = 1, 16
  workdir = str(tmp_path / "rm")
  config_utils.run(config, workdir)
  meta = stages.read_meta(workdir)
  assert meta["kind"] == "reward" and meta["step"] == 2 and meta["ensemble_size"] == 1
  assert meta["model"]["d_model"] == 32  # the classifier's shape
  rm = stages.load_reward_model(workdir, sharding.make_mesh((1, -1, 1)))
  assert rm.tokenizer.chat_format is not None


# ----------------------------------------------------------------------- the PPO critic


def test_the_ppo_critic_starts_from_a_classifier_or_a_causal_lm(setup):
  from rlhf_jax.trainers import ppo

  mesh, policy = setup
  value, params, shardings = ppo.critic_start(
    f"hf:{FIXTURES}/qwen2_rm", policy.tokenizer, mesh, "fsdp"
  )
  rm = hf.load_reward_model(f"hf:{FIXTURES}/qwen2_rm", mesh)
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(lambda x: x[0], rm.params))
  assert value.config == rm.module.config
  value, params, shardings = ppo.critic_start(
    f"hf:{FIXTURES}/qwen3", policy.tokenizer, mesh, "fsdp"
  )
  lm = hf.load_policy(f"hf:{FIXTURES}/qwen3", mesh)
  jax.tree.map(np.testing.assert_array_equal, params["trunk"], lm.params["trunk"])
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(params["head"]))  # a zero head
  assert jax.tree.map(lambda x: x.sharding, params) == shardings
  tokens = np.asarray([[1, 5, 6, 7]], np.int32)
  values = value.apply({"params": params}, tokens)
  assert values.shape == (1, 4) and not np.asarray(values).any()  # V = 0 at the start


def test_value_init_needs_a_separate_critic():
  from rlhf_jax.trainers import ppo

  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.update(value_init=f"hf:{FIXTURES}/qwen3", value_model="policy_head")
  with pytest.raises(errors.ConfigError, match=r"config\.value_init=.* starts a separate critic"):
    ppo.CONFIG_SPEC.validate(config)
  config.value_model = "separate"
  ppo.CONFIG_SPEC.validate(config)


# ------------------------------------------------------------------------------- SFT


@pytest.mark.slow
def test_sft_from_a_hugging_face_model_takes_the_compute_fields(tmp_path):
  """param_dtype="bfloat16" and unscanned layers apply to the imported Llama; chat records
  are rendered with its template."""
  config = config_utils.load_config(os.path.join(REPO, "configs/sft.py:runlocal"))
  config.update(policy_init=f"hf:{FIXTURES}/llama", total_steps=2, eval_every=2, log_every=1,
                checkpoint_every=2, batch_size=8)  # fmt: skip
  config.model.update(param_dtype="bfloat16", scan_layers=False)
  config.data.update(source="jsonl", train_jsonl=os.path.join(EXAMPLES, "sft.jsonl"))
  config.optim.warmup_steps = 1
  config.eval.num_samples = 0
  workdir = str(tmp_path / "sft")
  config_utils.run(config, workdir)
  policy = stages.load_policy(workdir, sharding.make_mesh((1, -1, 1)))
  cfg = policy.module.config
  assert cfg.param_dtype == "bfloat16" and not cfg.scan_layers and cfg.rope_scaling == "llama3"
  assert {str(x.dtype) for x in jax.tree.leaves(policy.params)} == {"bfloat16"}
  assert "layer_0" in policy.params["trunk"]
