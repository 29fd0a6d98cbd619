"""GRPO and RLOO trainer: runlocal on finished stages, reward functions, errors, resume."""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import config_utils, errors, metrics, stages
from rlhf_jax.data import testbed
from rlhf_jax.trainers import grpo
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# TRL's GRPO names where they exist (docs/rlhf_details.md), plus the PPO-style ones.
TRAIN_METRICS = (
  "reward",
  "reward_std",
  "frac_reward_zero_std",
  "objective/kl",
  "loss/policy",
  "loss/kl",
  "policy/clipfrac",
  "policy/approxkl",
  "policy/entropy",
  "completion_length",
  "frac_no_eos",
  "lr",
  "grad_norm",
)

# What `length_reward` saw, for the test that passes it as config.reward_fn.
CALLS = []


def length_reward(prompts, responses):
  """A Python reward function: (prompts, responses) -> one float per response."""
  CALLS.append((list(prompts), list(responses)))
  return [float(len(r.split())) for r in responses]


def wrong_length_reward(prompts, responses):
  return [0.0]


def load(spec, reward_dir=None, **overrides):
  config = config_utils.load_config(os.path.join(REPO, spec))
  if reward_dir:
    config.policy_init = os.path.join(reward_dir, "sft")
    config.reward_init = reward_dir
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def train_rows(workdir):
  return [r for r in metrics.read_metrics(workdir) if "reward" in r]


def eval_steps(workdir):
  return [r["step"] for r in metrics.read_metrics(workdir) if "eval/gold_reward" in r]


@pytest.mark.slow
def test_grpo_runlocal_on_finished_stages(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "grpo")
  config = load("configs/grpo.py:runlocal", reward_dir)
  final = config_utils.run(config, workdir)

  # Gold reward is measured before any update and at each eval.
  assert eval_steps(workdir) == [0, 6, 12]
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  for key in (*TRAIN_METRICS, *grpo.TIMING_METRICS[:2], "time/rollout_s", "time/update_s"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(0.0 <= r["frac_reward_zero_std"] <= 1.0 for r in rows)
  assert all(r["loss/kl"] >= 0.0 for r in rows)  # k3 is non-negative
  assert rows[-1]["loss/kl"] > 0.0  # the policy moved off the reference
  assert 0.0 <= final["eval/win_rate_vs_sft"] <= 1.0
  assert final["eval/kl_to_ref"] > -0.5  # a KL far below 0 means mismatched settings
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "grpo"
  assert summary["gold_reward_gain"] == pytest.approx(
    summary["gold_reward"] - summary["sft_gold_reward"]
  )
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
    f"step_{s:07d}.jsonl" for s in (0, 6, 12)
  ]
  # The trained policy is exported like any finished stage.
  assert stages.read_meta(workdir)["kind"] == "policy"


@pytest.mark.slow
def test_rloo_with_the_gold_reward_needs_no_reward_model(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "rloo")
  config = load(
    "configs/rloo.py:runlocal",
    reward_fn="gold",
    total_steps=4,
    eval_every=4,
    checkpoint_every=4,
    **{"eval.num_prompts": 16},
  )
  config.policy_init = os.path.join(reward_dir, "sft")  # no reward_init: none is trained
  config_utils.run(config, workdir)

  assert not os.path.exists(os.path.join(workdir, "reward"))
  assert eval_steps(workdir) == [0, 4]
  rows = train_rows(workdir)
  assert rows
  for key in TRAIN_METRICS:
    assert all(np.isfinite(r[key]) for r in rows), key
  # KL in the reward: the rewards the baseline sees are the scores minus coef * KL.
  last = rows[-1]
  assert last["objective/rlhf_reward"] == pytest.approx(
    last["reward"] - config.kl.coef * last["objective/kl"], abs=1e-4
  )
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "rloo" and summary["reward_fn"] == "gold"
  # No reward model: the proxy is the reward the policy was trained on, the gold function.
  assert summary["proxy_reward"] == summary["gold_reward"]


@pytest.mark.slow
def test_python_reward_function_sees_grouped_prompts(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  workdir = str(tmp_path / "fn")
  config = load(
    "configs/grpo.py:runlocal",
    reward_fn="tests.trainers.test_grpo:length_reward",
    missing_eos_penalty=False,
    total_steps=2,
    eval_every=2,
    checkpoint_every=2,
    **{"eval.num_prompts": 16},
  )
  config.policy_init = os.path.join(reward_dir, "sft")
  CALLS.clear()
  config_utils.run(config, workdir)

  g = config.group_size
  # Training rollouts; the evaluator also asks the function, for the eval's proxy reward.
  evals = [c for c in CALLS if len(c[0]) == 16]
  CALLS[:] = [c for c in CALLS if len(c[0]) != 16]
  assert len(CALLS) == 2 and len(evals) == 3  # the SFT samples, step 0 and step 2
  train_prompts = set(testbed.prompts("train", config.data.num_prompts, config.data.seed))
  for prompts, responses in CALLS:
    assert len(prompts) == len(responses) == config.prompts_per_iter * g
    # The decoded prompts are the testbed's, each repeated G times in a row ...
    assert set(prompts) <= train_prompts
    for i in range(0, len(prompts), g):
      assert prompts[i : i + g] == [prompts[i]] * g
    # ... and each repeat draws its own response.
    assert len(set(responses)) > len(responses) // 2
  # The logged reward is the function's value: the mean word count of the last rollout.
  first = np.mean([len(r.split()) for r in CALLS[-1][1]])
  assert train_rows(workdir)[-1]["reward"] == pytest.approx(first, rel=1e-5)


def test_bad_reward_fn_and_config_values_are_named(tmp_path):
  # Checked before any stage trains, so no fixture is needed.
  cases = [
    ({"reward_fn": "no_such_module_xyz:score"}, "config.reward_fn='no_such_module_xyz:score'"),
    ({"reward_fn": "tests.trainers.test_grpo:nope"}, "has no function 'nope'"),
    ({"reward_fn": "length_reward"}, "package.module:function"),
    ({"group_size": 1}, "config.group_size"),
    ({"minibatch_size": 12}, "config.minibatch_size"),
    ({"advantage": "ppo"}, "config.advantage"),
    ({"kl.mode": "both"}, "config.kl.mode"),
    ({"kl.estimator": "k4"}, "config.kl.estimator"),
    ({"loss_aggregation": "sum"}, "config.loss_aggregation"),
  ]
  for overrides, message in cases:
    config = load("configs/grpo.py:runlocal", **overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
      grpo.train(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "sft")


def test_host_rewards_are_checked():
  name = "tests.trainers.test_grpo:wrong_length_reward"
  with pytest.raises(errors.TrainingError, match="returned shape \\(1,\\) for 2 responses"):
    grpo.host_rewards(wrong_length_reward, name, ["a", "b"], ["x", "y"])
  with pytest.raises(errors.TrainingError, match="non-finite"):
    grpo.host_rewards(lambda p, r: [0.0, float("nan")], name, ["a", "b"], ["x", "y"])
  with pytest.raises(errors.TrainingError, match="not floats"):
    grpo.host_rewards(lambda p, r: ["good", "bad"], name, ["a", "b"], ["x", "y"])
  np.testing.assert_array_equal(
    grpo.host_rewards(length_reward, name, ["a", "b"], ["x y", "z"]), [2.0, 1.0]
  )


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_is_exact(reward_runlocal, tmp_path):
  """Params, optimizer, RNG, prompt position: all restored exactly."""
  _, reward_dir, _ = reward_runlocal
  overrides = [
    f"--config.policy_init={os.path.join(reward_dir, 'sft')}",
    f"--config.reward_init={reward_dir}",
    "--config.total_steps=8",
    "--config.prompts_per_iter=4",
    "--config.minibatch_size=8",
    "--config.num_epochs=2",
    "--config.log_every=2",
    "--config.eval_every=4",
    "--config.checkpoint_every=2",
    "--config.keep_checkpoints=10",
    "--config.eval.num_prompts=16",  # the rollout batch: evals reuse the sampler's program
  ]
  config = "configs/grpo.py:runlocal"
  resume.check_kill_and_sigterm(
    tmp_path, config, overrides, total_steps=8, kill_after=2, timing_metrics=grpo.TIMING_METRICS
  )
  straight = str(tmp_path / "straight")
  assert stages.read_meta(straight)["eval"] == resume.final_eval(straight)
  ref_summary = resume.read_summary(straight)
  assert ref_summary["gold_reward"] == resume.final_eval(straight)["eval/gold_reward"]
  # Stopped after the final checkpoint, before the summary and the export: the rerun
  # recomputes the final eval (same samples file, no new metrics line) for the export.
  late = resume.rerun_after_late_stop(tmp_path, config, overrides, also_remove=("summary.json",))
  resume.assert_same_run(straight, late, total_steps=8, timing_metrics=grpo.TIMING_METRICS)
  for name in ("killed", "late"):
    resume.assert_same_export(straight, str(tmp_path / name))
    assert resume.read_summary(str(tmp_path / name)) == ref_summary, name


@pytest.mark.slow
def test_a_continued_rloo_stage_trains_on_as_one_run(reward_runlocal, tmp_path):
  """continue_from + schedule_steps: 2 iterations, then 2 more in a new stage, end with the
  state 4 straight iterations reach (policy, optimizer, prompts, RNG)."""
  _, reward_dir, _ = reward_runlocal
  steps = dict(schedule_steps=4, eval_every=2, checkpoint_every=2, log_every=2)
  steps["eval.num_prompts"] = 16
  straight, first, second = (str(tmp_path / n) for n in ("straight", "first", "second"))
  config_utils.run(load("configs/rloo.py:runlocal", reward_dir, total_steps=4, **steps), straight)
  config_utils.run(load("configs/rloo.py:runlocal", reward_dir, total_steps=2, **steps), first)
  continued = load(
    "configs/rloo.py:runlocal", reward_dir, total_steps=4, continue_from=first, **steps
  )
  config_utils.run(continued, second)
  ref_step, ref_state = resume.final_state(straight)
  got_step, got_state = resume.final_state(second)
  assert ref_step == got_step == 4
  jax.tree.map(np.testing.assert_array_equal, got_state, ref_state)
  assert eval_steps(second) == [2, 4]
  final = lambda d: [r for r in metrics.read_metrics(d) if "eval/gold_reward" in r][-1]
  assert final(second)["eval/gold_reward"] == final(straight)["eval/gold_reward"]
  summary = resume.read_summary(second)
  assert summary["method"] == "rloo" and summary["continued_from"] == first
  assert summary["sft_gold_reward"] == resume.read_summary(straight)["sft_gold_reward"]
