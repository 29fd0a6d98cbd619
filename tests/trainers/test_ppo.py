"""PPO trainer: runlocal on finished SFT and reward stages; metrics, samples, summary."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import config_utils, errors, metrics, sharding, stages
from rlhf_jax.trainers import ppo
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The names researchers read in TRL / lm-human-preferences logs (docs/rlhf_details.md).
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
  assert [r["step"] for r in evals] == [0, 10, 20]
  train_rows = [r for r in rows if "objective/kl" in r]
  assert train_rows
  for key in TRAIN_METRICS:
    assert all(np.isfinite(r[key]) for r in train_rows), key
  # The adaptive controller moves beta away from its initial value.
  assert train_rows[-1]["objective/kl_coef"] != config.kl.init_coef
  assert 0.0 <= final["eval/win_rate_vs_sft"] <= 1.0
  assert final["eval/kl_to_ref"] > -0.5  # a KL far below 0 means mismatched settings
  # PPO raises the gold reward, which it never sees, well beyond eval noise
  # (+0.9 to +1.4 over seeds on 64 held-out prompts; the SE of a mean is ~0.15).
  assert summary_gain(workdir) > 0.4
  assert final["eval/win_rate_vs_sft"] > 0.6
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["gold_reward_gain"] == pytest.approx(
    summary["gold_reward"] - summary["sft_gold_reward"]
  )
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
    f"step_{s:07d}.jsonl" for s in (0, 10, 20)
  ]
  # The trained policy is exported like any finished stage.
  assert stages.read_meta(workdir)["kind"] == "policy"


def summary_gain(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["gold_reward_gain"]


@pytest.mark.slow
def test_value_head_on_the_policy(reward_runlocal, tmp_path):
  """config.value_model=policy_head: one trunk, a value head trained with it, plain export."""
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "ppo_head")
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  config.value_model = "policy_head"
  config.total_steps = config.log_every = config.eval_every = config.checkpoint_every = 4
  config.eval.num_prompts = 16
  config_utils.run(config, workdir)
  rows = [r for r in metrics.read_metrics(workdir) if "loss/value" in r]
  assert rows and all(np.isfinite(r[k]) for r in rows for k in TRAIN_METRICS)
  # The zero-initialised head has learned something: values are no longer all 0.
  assert rows[-1]["val/vpred"] != 0.0 and rows[-1]["val/grad_norm"] > 0.0
  ckpt_dir = os.path.join(workdir, "checkpoints", "4", "state")
  state = ocp.StandardCheckpointer().restore(ckpt_dir)
  assert set(state["policy"]) == {"trunk", "value"} and not state["value"]
  assert np.any(np.asarray(state["policy"]["value"]["kernel"]) != 0.0)
  # The export is the language model alone, loadable like any policy.
  mesh = sharding.make_mesh((1, -1, 1))
  policy = stages.load_policy(workdir, mesh)
  assert "value" not in policy.params


def test_unknown_value_model_is_refused(tmp_path):
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.value_model = "shared"
  with pytest.raises(ValueError, match=r"config\.value_model='shared'"):
    ppo.train(config, str(tmp_path))


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


@pytest.mark.slow
def test_a_continued_stage_trains_on_as_one_run(reward_runlocal, tmp_path):
  """continue_from + schedule_steps: 4 iterations, then 4 more in a new stage, end with the
  state 8 straight iterations reach (policy, critic, optimizers, KL controller, prompts)."""
  _, reward_dir, _ = reward_runlocal

  def config(total_steps, **extra):
    c = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
    c.policy_init = os.path.join(reward_dir, "sft")
    c.reward_init = reward_dir
    c.total_steps, c.schedule_steps = total_steps, 8
    c.eval_every = c.checkpoint_every = c.log_every = 4
    c.eval.num_prompts = 16
    c.update(extra)
    return c

  straight, first, second = (str(tmp_path / n) for n in ("straight", "first", "second"))
  config_utils.run(config(8), straight)
  config_utils.run(config(4), first)
  config_utils.run(config(8, continue_from=first), second)

  ref_step, ref_state = resume.final_state(straight)
  got_step, got_state = resume.final_state(second)
  assert ref_step == got_step == 8
  jax.tree.map(np.testing.assert_array_equal, got_state, ref_state)
  # Its first eval is its start, step 4 (the first stage's end); the gains are over SFT.
  evals = lambda d: {r["step"]: r for r in metrics.read_metrics(d) if "eval/gold_reward" in r}
  ref_evals, got_evals = evals(straight), evals(second)
  assert sorted(got_evals) == [4, 8]
  for step in (4, 8):
    for key, value in ref_evals[step].items():
      if key.startswith("eval/"):
        assert got_evals[step][key] == value, (step, key)
  ref_summary, got_summary = resume.read_summary(straight), resume.read_summary(second)
  for key in ("sft_gold_reward", "sft_gold_reward_std", "gold_reward", "gold_reward_gain"):
    assert got_summary[key] == ref_summary[key], key
  assert got_summary["continued_from"] == first and got_summary["start_step"] == 4
  assert got_summary["start_gold_reward"] == ref_evals[4]["eval/gold_reward"]

  # Nothing is left to train past a finished stage's total_steps; another trainer is refused.
  with pytest.raises(errors.ConfigError, match=r"continue_from=.*ended at step 8"):
    config_utils.run(config(8, continue_from=second), str(tmp_path / "third"))
  with pytest.raises(errors.ConfigError, match=r"schedule_steps=8 is less than .*total_steps=9"):
    config_utils.run(config(9, continue_from=second), str(tmp_path / "fourth"))
