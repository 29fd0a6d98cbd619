"""experiments/compare.py: the plan of runs, and a tiny comparison end to end."""

import json
import os

import pytest

from experiments import compare
from rlhf_jax import config_utils, errors
from rlhf_jax.sweeps import executors


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
  assert ppo.cell()["kl.init_coef"] == ppo.value and ppo.cell()["seed"] == 0
  local = compare.plan("runlocal", ["ppo"], seeds=(1, 2))
  assert all(r.config.endswith("configs/ppo.py:runlocal") for r in local)
  assert [(r.value, r.seed) for r in local] == [(0.01, 1), (0.01, 2), (0.1, 1), (0.1, 2)]


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
  with pytest.raises(ValueError, match="--seeds"):
    compare.plan("full", ["ppo"], overrides={"seed": 1})


def test_a_wrong_override_key_is_named_before_anything_runs(tmp_path):
  runs = compare.plan("runlocal", ["ppo"], per_method={"ppo": {"kl.init_coeff": 0.1}})
  with pytest.raises(errors.ConfigError, match=r"config\.kl\.init_coeff.*the sweep cell"):
    compare.compare(str(tmp_path / "c"), runs)
  assert not (tmp_path / "c").exists()


def test_best_of_n_reports_its_largest_n():
  run = compare.plan("runlocal", ["best_of_n"])[0]
  numbers = dict.fromkeys(compare.COLUMNS[:-3], 1.0)
  record = {
    "workdir": "w",
    "metrics": {**numbers, "wall_time_s": 3.0, "n": 16.0},
    "curve": [{"gold_reward": 0.5, "kl_to_ref": 0.0}, {"gold_reward": 1.5, "kl_to_ref": 2.0}],
  }
  row = compare.row(run, record)
  assert (row["knob"], row["value"], row["peak_gold_reward"], row["peak_gold_kl"]) == (
    "n",
    16,
    1.5,
    2.0,
  )
  (merged,) = compare.aggregate([row])
  assert merged["seeds"] == [0] and merged["gold_reward"] == 1.0
  assert "| best_of_n | n=16 | 1 | +1.00 (+1.00) |" in compare.table([merged])


@pytest.mark.slow
def test_ppo_at_two_kl_budgets_and_three_seeds(reward_runlocal, tmp_path):
  """The methods table as a sweep: 2 KL budgets x 3 seeds at runlocal size, 2 processes."""
  _, reward_dir, _ = reward_runlocal
  shared = {"policy_init": os.path.join(reward_dir, "sft"), "reward_init": reward_dir}
  tiny = {"total_steps": 2, "log_every": 2, "eval_every": 2, "checkpoint_every": 2}
  runs = compare.plan(
    "runlocal",
    ["ppo"],
    overrides=shared,
    per_method={"ppo": {**tiny, "eval.num_prompts": 8}},
    seeds=(0, 1, 2),
  )
  workdir = str(tmp_path / "compare")
  rows = compare.compare(workdir, runs, executors.LocalExecutor(parallel=2))
  assert [(r["label"], r["seeds"]) for r in rows] == [
    ("ppo kl.init_coef=0.01", [0, 1, 2]),
    ("ppo kl.init_coef=0.1", [0, 1, 2]),
  ]
  for r in rows:
    assert r["gold_reward_gain"] == pytest.approx(r["gold_reward"] - r["sft_gold_reward"])
    assert r["peak_gold_reward"] >= r["gold_reward"] - 1e-9
    low, high = r["gold_reward_ci"]
    assert low < r["gold_reward"] < high  # three seeds differ: a real interval
  with open(os.path.join(workdir, "comparison.md")) as f:
    text = f.read()
  assert text.count("\n| ppo |") == 2 and " ± " in text and "| 3 |" in text
  with open(os.path.join(workdir, "comparison.json")) as f:
    assert len(json.load(f)) == 2
  assert os.path.getsize(os.path.join(workdir, "reward_vs_kl.png")) > 10_000
  with open(os.path.join(workdir, "sweep_report.json")) as f:
    (comparison,) = json.load(f)["comparisons"]
  assert comparison["paired"] and comparison["n"] == 3
  # Finished runs are reused: a rerun trains nothing and gives the same rows.
  stamp = os.path.getmtime(os.path.join(rows[0]["workdirs"][0], "summary.json"))
  again = compare.compare(workdir, runs)
  assert json.dumps(again, sort_keys=True) == json.dumps(rows, sort_keys=True)
  assert os.path.getmtime(os.path.join(rows[0]["workdirs"][0], "summary.json")) == stamp
