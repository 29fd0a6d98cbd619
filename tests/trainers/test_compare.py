"""experiments/compare.py: the plan of runs, and a tiny comparison end to end."""

import json
import os

import pytest

from experiments import compare
from rlhf_jax import config_utils


def test_plan_covers_every_method_at_several_budgets():
  runs = compare.plan("full")
  by_method = {}
  for run in runs:
    by_method.setdefault(run.method, []).append(run)
  assert set(by_method) == {"ppo", "dpo", "grpo", "rloo", "best_of_n"}
  for method in ("ppo", "dpo", "grpo", "rloo"):
    assert len(by_method[method]) >= 2, method  # several KL budgets
  assert len(by_method["best_of_n"]) == 1  # one run gives every n
  ppo = by_method["ppo"][0]
  assert ppo.overrides["kl.controller"] == "fixed"
  assert ppo.subdir == os.path.join("ppo", f"kl.init_coef={ppo.value}")
  local = compare.plan("runlocal", ["ppo"], overrides={"seed": 2})
  assert all(r.config.endswith("configs/ppo.py:runlocal") for r in local)
  assert all(r.overrides["seed"] == 2 for r in local)


@pytest.mark.parametrize("size", ["full", "runlocal"])
def test_every_planned_key_exists_in_its_config(size):
  """A sweep knob or override that a config lacks would fail only after hours of runs."""
  for run in compare.plan(size):
    config = config_utils.load_config(run.config)
    for key in [*run.overrides, *([run.knob] if run.knob else [])]:
      config_utils.check_key(config, key, source=run.label)
    assert "policy_init" in config and "reward_init" in config


def test_plan_errors():
  with pytest.raises(ValueError, match="Unknown method 'sac'"):
    compare.plan("full", ["ppo", "sac"])
  with pytest.raises(ValueError, match="size='huge'"):
    compare.plan("huge")


def test_a_wrong_override_key_is_named(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  runs = compare.plan("runlocal", ["ppo"], per_method={"ppo": {"kl.init_coeff": 0.1}})
  with pytest.raises(ValueError, match=r"config\.kl\.init_coeff.*the ppo overrides"):
    compare.execute(runs[0], str(tmp_path), os.path.join(reward_dir, "sft"), reward_dir)


@pytest.mark.slow
def test_tiny_comparison_writes_table_and_plot(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  shared = {"policy_init": os.path.join(reward_dir, "sft"), "reward_init": reward_dir}
  tiny = {"total_steps": 2, "log_every": 2, "eval_every": 2, "checkpoint_every": 2}
  runs = compare.plan(
    "runlocal",
    ["ppo", "best_of_n"],
    per_method={
      "ppo": {**tiny, "eval.num_prompts": 8},
      "best_of_n": {"num_samples": 4, "ns": (1, 2, 4), "eval.num_prompts": 8},
    },
  )
  workdir = str(tmp_path / "compare")
  rows = compare.compare(workdir, runs, "runlocal", shared)
  assert [r["label"] for r in rows] == [
    "ppo kl.init_coef=0.01",
    "ppo kl.init_coef=0.1",
    "best_of_n",
  ]
  for r in rows:
    assert r["gold_reward_gain"] == pytest.approx(r["gold_reward"] - r["sft_gold_reward"])
    assert r["peak_gold_reward"] >= r["gold_reward"]
  assert rows[-1]["value"] == 4  # best-of-n reports its largest n
  with open(os.path.join(workdir, "comparison.md")) as f:
    text = f.read()
  assert text.count("\n| ppo |") == 2 and "| best_of_n | n=4 |" in text
  with open(os.path.join(workdir, "comparison.json")) as f:
    assert json.load(f) == rows
  assert os.path.getsize(os.path.join(workdir, "reward_vs_kl.png")) > 10_000
  # Finished runs are reused: a rerun trains nothing and gives the same rows.
  stamp = os.path.getmtime(os.path.join(rows[0]["workdir"], "summary.json"))
  assert compare.compare(workdir, runs, "runlocal", shared) == rows
  assert os.path.getmtime(os.path.join(rows[0]["workdir"], "summary.json")) == stamp
