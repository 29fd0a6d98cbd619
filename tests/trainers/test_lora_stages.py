"""LoRA through the trainers (`config.lora.rank > 0`): SFT, DPO and the reward model train
only their adapters (and the reward heads), and export them merged, as a plain model that
later stages and transformers load."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import config_utils, hf, sharding, stages
from rlhf_jax.models import lora
from tests import shared

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
EXAMPLES = os.path.join(REPO, "docs", "examples", "own_data")
pytestmark = pytest.mark.slow


def _config(name: str, **changes):
  config = config_utils.load_config(os.path.join(REPO, f"configs/{name}.py:runlocal"))
  config.update(total_steps=2, eval_every=2, log_every=1, checkpoint_every=2)
  if "batch_size" in config:
    config.batch_size = 8
  config.update(changes)
  config.optim.warmup_steps = 1
  config.optim.lr = 1e-2
  config.lora.update(rank=2, alpha=4.0, targets="q,v,o,up,down")
  return config


def _leaves(tree):
  return {
    "/".join(str(k.key) for k in path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _kls(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["objective/kl"] for r in rows if "objective/kl" in r]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, -1, 1))


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory):
  def build(workdir):
    config = _config("sft", policy_init=f"hf:{FIXTURES}/qwen2")
    config.data.update(source="jsonl", train_jsonl=os.path.join(EXAMPLES, "sft.jsonl"))
    config.eval.num_samples = 4
    config_utils.run(config, workdir)
    return workdir

  return shared.once(tmp_path_factory, "lora_sft", build)


def test_sft_trains_adapters_only_and_exports_them_merged(sft_stage, mesh, tmp_path):
  policy = stages.load_policy(sft_stage, mesh)
  assert policy.module.config.lora_rank == 0  # a plain model: the adapters are merged
  layout = dict(scan_layers=policy.module.config.scan_layers)  # the SFT config's layer layout
  start = _leaves(hf.load_policy(f"hf:{FIXTURES}/qwen2", mesh, **layout).params)
  after = _leaves(policy.params)
  assert set(after) == set(start)
  changed = {k for k in start if not np.array_equal(start[k], after[k])}
  # Exactly the adapted projections moved (q, v, o, up, down); k, gate, norms, embeddings not.
  assert {k.rsplit("/", 1)[1] for k in changed} == {"q", "v", "o", "up", "down"}
  # The merged export goes out as a Hugging Face model with the same logits.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf.export_policy(policy.params, policy.module.config, policy.tokenizer, str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  ids = np.asarray([[0, 5, 9, 13, 17, 21]])
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  ours, _ = policy.module.apply({"params": policy.params}, ids)
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_dpo_with_adapters_keeps_the_base_and_exports_merged(sft_stage, mesh, tmp_path):
  config = _config("dpo", policy_init=sft_stage, reward_init=f"hf:{FIXTURES}/qwen2_rm")
  config.data.update(source="jsonl", train_files=(os.path.join(EXAMPLES, "prefs.jsonl"),))
  config.update(max_len=64, prompt_len=48, max_new_tokens=8)
  config.lora.dropout = 0.1
  config.eval.num_prompts = 8
  workdir = str(tmp_path / "dpo")
  config_utils.run(config, workdir)
  before = _leaves(stages.load_policy(sft_stage, mesh).params)
  after = _leaves(stages.load_policy(workdir, mesh).params)
  changed = {k.rsplit("/", 1)[1] for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"q", "v", "o", "up", "down"}
  assert stages.read_meta(workdir)["model"]["lora_rank"] == 0


def test_reward_model_with_adapters_trains_them_and_its_heads(mesh, tmp_path):
  config = _config("reward", policy_init=f"hf:{FIXTURES}/qwen2", ensemble_size=2, max_len=64)
  files = (os.path.join(EXAMPLES, "prefs.jsonl"),)
  config.data.update(source="jsonl", train_files=files, responses_per_prompt=3, prompt_len=48,
                     max_new_tokens=8, sample_batch=16)  # fmt: skip
  config.normalize_samples = 16
  workdir = str(tmp_path / "rm")
  config_utils.run(config, workdir)
  rm = stages.load_reward_model(workdir, mesh)
  assert rm.module.config.lora_rank == 0 and not jax.tree.leaves(lora.adapters(rm.params))
  layout = dict(scan_layers=rm.module.config.scan_layers)
  start = _leaves(hf.load_policy(f"hf:{FIXTURES}/qwen2", mesh, **layout).params["trunk"])
  member = _leaves(jax.tree.map(lambda x: x[0], rm.params["trunk"]))
  changed = {k.rsplit("/", 1)[1] for k in start if not np.array_equal(start[k], member[k])}
  assert changed == {"q", "v", "o", "up", "down"}
  # The members' adapters differ (each its own A), so their scores do too.
  trunks = jax.tree.map(lambda x: np.asarray(x[0] != x[1]).any(), rm.params["trunk"])
  assert any(jax.tree.leaves(trunks))


def test_ppo_with_adapters_uses_its_base_as_the_reference(sft_stage, mesh, tmp_path):
  """One copy of the base: the SFT parameters are released once the state holds them, the
  reference is the state's frozen base (KL 0 at the start), and the export is merged."""
  config = _config("ppo", policy_init=sft_stage, reward_init=f"hf:{FIXTURES}/qwen2_rm")
  config.data.update(source="jsonl", prompts=os.path.join(EXAMPLES, "prompts.jsonl"))
  config.update(prompt_len=40, rollout_batch_size=8, minibatch_size=8, max_new_tokens=8,
                value_model="policy_head", total_steps=2)  # fmt: skip
  config.eval.num_prompts = 8
  workdir = str(tmp_path / "ppo")
  final = config_utils.run(config, workdir)
  assert np.isfinite(final["eval/kl_to_ref"])
  kls = _kls(workdir)
  # The policy starts as its reference, then moves away from it (a reference that followed
  # the policy would keep the KL at 0).
  assert abs(kls[0]) < 1e-5 and abs(kls[-1]) > 1e-7, kls
  before = _leaves(stages.load_policy(sft_stage, mesh).params)
  after = _leaves(stages.load_policy(workdir, mesh).params)
  changed = {k.rsplit("/", 1)[1] for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"q", "v", "o", "up", "down"}


def test_rloo_with_adapters_uses_its_base_as_the_reference(sft_stage, tmp_path):
  config = _config("rloo", policy_init=sft_stage, reward_init=f"hf:{FIXTURES}/qwen2_rm")
  config.data.update(source="jsonl", prompts=os.path.join(EXAMPLES, "prompts.jsonl"))
  # Scored as they are: 8 new tokens rarely end with EOS, and a constant missing-EOS score
  # for a whole group would leave no advantage to learn from.
  config.update(prompt_len=40, prompts_per_iter=4, max_new_tokens=8, missing_eos_penalty=False)
  config.optim.warmup_steps = 0  # the first update moves the policy already
  config.eval.num_prompts = 8
  workdir = str(tmp_path / "rloo")
  config_utils.run(config, workdir)
  kls = _kls(workdir)
  # The policy starts as its reference, then moves away from it (a reference that followed
  # the policy would keep the KL at 0).
  assert abs(kls[0]) < 1e-5 and abs(kls[-1]) > 1e-7, kls
  assert stages.read_meta(workdir)["model"]["lora_rank"] == 0
