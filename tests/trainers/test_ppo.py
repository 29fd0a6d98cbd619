"""PPO trainer: runlocal on finished SFT and reward stages; metrics, samples, summary."""

import json
import os

import numpy as np
import pytest

from rlhf_jax import config_utils, metrics, stages
from rlhf_jax.trainers import ppo
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The names researchers read in TRL / lm-human-preferences logs (RLHF_NOTES.md).
TRAIN_METRICS = (
  "objective/kl",
  "objective/kl_coef",
  "objective/entropy",
  "objective/scores",
  "objective/non_score_reward",
  "policy/approxkl",
  "policy/clipfrac",
  "policy/entropy",
  "loss/policy",
  "loss/value",
  "val/vpred",
  "val/error",
  "val/clipfrac",
  "val/var_explained",
  "returns/mean",
  "returns/var",
  "response_length",
  "frac_no_eos",
  "lr",
)


@pytest.mark.slow
def test_runlocal_on_finished_stages(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "ppo")
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  final = config_utils.run(config, workdir)

  rows = metrics.read_metrics(workdir)
  evals = [r for r in rows if "eval/gold_reward" in r]
  # Gold reward is measured before any update and at each eval.
  assert [r["step"] for r in evals] == [0, 6, 12]
  train_rows = [r for r in rows if "objective/kl" in r]
  assert train_rows
  for key in TRAIN_METRICS:
    assert all(np.isfinite(r[key]) for r in train_rows), key
  # The adaptive controller moves beta away from its initial value.
  assert train_rows[-1]["objective/kl_coef"] != config.kl.init_coef
  assert 0.0 <= final["eval/win_rate_vs_sft"] <= 1.0
  assert final["eval/kl_to_ref"] > -0.5  # a KL far below 0 means mismatched settings
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["gold_reward_gain"] == pytest.approx(
    summary["ppo_gold_reward"] - summary["sft_gold_reward"]
  )
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
    f"step_{s:07d}.jsonl" for s in (0, 6, 12)
  ]
  # The trained policy is exported like any finished stage.
  assert stages.read_meta(workdir)["kind"] == "policy"


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_is_exact(reward_runlocal, tmp_path):
  """Params, optimizers, RNG, KL controller, prompt position: all restored exactly."""
  _, reward_dir, _ = reward_runlocal
  overrides = [
    f"--config.policy_init={os.path.join(reward_dir, 'sft')}",
    f"--config.reward_init={reward_dir}",
    "--config.total_steps=24",
    "--config.log_every=4",
    "--config.eval_every=12",
    "--config.checkpoint_every=4",
    "--config.keep_checkpoints=10",
    "--config.eval.num_prompts=16",
  ]
  resume.check_kill_and_sigterm(
    tmp_path,
    "configs/ppo.py:runlocal",
    overrides,
    total_steps=24,
    kill_after=8,
    timing_metrics=ppo.TIMING_METRICS,
  )
