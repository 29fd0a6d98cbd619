"""experiments/loop_study.py: the grid, the cells' configs, the report (on made-up runs)."""

import json
import math
import os

from experiments import loop_study
from rlhf_jax.trainers import loop


def test_one_round_cells_run_once_as_random():
  cells = loop_study.cells([1, 3], ["random", "ensemble_disagreement"])
  assert cells == [(1, "random"), (3, "random"), (3, "ensemble_disagreement")]


def test_a_cell_splits_the_budget_and_the_training_over_its_rounds():
  config = loop_study.cell_config("study", 3, "random", 2, 3000, "runs/sft", ("e.jsonl",), 3.0)
  assert (config.rounds, config.strategy, config.seed, config.data.seed) == (3, "random", 2, 2)
  assert config.labels_per_round == 1000 and config.total_labels == 3000
  # 3 candidates per label: 3000 candidate pairs from 6 pairs per prompt of 4 responses.
  assert config.candidates.prompts_per_round == 500
  assert config.reward.total_steps == 100 and config.rl.total_steps == 10
  assert config.eval_files == ("e.jsonl",)
  one = loop_study.cell_config("study", 1, "random", 0, 3000, "runs/sft", (), 3.0)
  assert one.reward.total_steps == 300 and one.rl.total_steps == 30
  # Every cell is a valid loop config (the stage paths are checked at run time).
  one.policy_init = ""
  loop.CONFIG_SPEC.validate(one)


def _run(golds, accuracies, labels, precision=1.0):
  return {
    "rounds": [
      {
        "labels_total": n,
        "reward_eval_accuracy": a,
        "gate_testbed": {"precision": precision, "recall": 1.0},
        "policy": {"gold_reward": g, "gold_reward_gain": g - 0.5, "kl_to_ref": 2.0},
      }
      for g, a, n in zip(golds, accuracies, labels, strict=True)
    ]
  }


def test_report_means_and_stds_over_seeds_table_and_plot(tmp_path):
  results = {
    "rounds=1,strategy=random": {0: _run([1.0], [0.70], [300]), 1: _run([1.2], [0.72], [300])},
    "rounds=2,strategy=random": {
      0: _run([0.8, 1.4], [0.66, 0.74], [150, 300], precision=None),
      1: _run([0.9, 1.6], [0.68, 0.76], [150, 300], precision=0.5),
    },
  }
  text = loop_study.report(str(tmp_path), results, "note")
  rows = {r["cell"]: r for r in json.load(open(tmp_path / "loop_study.json"))["rows"]}
  one = rows["rounds=1,strategy=random"]
  assert math.isclose(one["gold_reward"], 1.1) and math.isclose(one["rm_accuracy"], 0.71)
  assert math.isclose(one["gold_reward_std"], math.sqrt(0.02))
  two = rows["rounds=2,strategy=random"]
  assert math.isclose(two["gold_reward"], 1.5) and two["labels"] == 300
  assert two["gate_precision"] == 0.5  # a seed whose gate flagged nobody has no precision
  assert "| rounds=2,strategy=random | 2 | 300 | 0.750 +- 0.014 | 1.500 +- 0.141 |" in text
  assert os.path.getsize(tmp_path / "loop_study.png") > 10_000
  assert "note" in (tmp_path / "loop_study.md").read_text()
