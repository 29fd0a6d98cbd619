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


def test_labels_to_reach_interpolates_from_the_sft_point_between_rounds():
  run = _run([1.0, 1.4, 1.5], [0.7] * 3, [100, 200, 300])  # SFT gold 0.5 (gain = gold - 0.5)
  assert math.isclose(loop_study.labels_to_reach(run, 1.2), 150.0)
  assert math.isclose(loop_study.labels_to_reach(run, 0.75), 50.0)  # before the first round
  assert loop_study.labels_to_reach(run, 0.4) == 0.0  # SFT is there already
  assert loop_study.labels_to_reach(run, 1.5) == 300.0
  assert loop_study.labels_to_reach(run, 1.51) is None


def test_each_cell_against_one_round_is_paired_by_seed_with_holm_and_label_shares(tmp_path):
  one = {s: _run([g], [a], [300]) for s, g, a in [(0, 1.0, 0.70), (1, 1.2, 0.72), (2, 1.1, 0.71)]}
  # Three rounds: gold +0.3/+0.31/+0.29 on each seed (resolved), accuracy +0.01 -0.01 +0.03.
  three = {
    0: _run([0.8, 1.1, 1.3], [0.6, 0.65, 0.71], [100, 200, 300]),
    1: _run([1.1, 1.3, 1.51], [0.6, 0.65, 0.71], [100, 200, 300]),
    2: _run([1.2, 1.3, 1.39], [0.6, 0.65, 0.74], [100, 200, 300]),
  }
  worse = {s: _run([0.6, 0.7, 0.9], [0.6, 0.6, 0.7], [100, 200, 300]) for s in (0, 1)}
  results = {
    loop_study.BASELINE: one,
    "rounds=3,strategy=random": three,
    "rounds=3,strategy=x": worse,
  }
  rows = {r["cell"]: r for r in loop_study.against_one_round(results)}
  gold = rows["rounds=3,strategy=random"]["gold"]
  assert gold["paired"] and gold["n"] == 3 and math.isclose(gold["mean"], 0.3)
  assert gold["low"] > 0 and gold["resolved_holm"]
  # Holm over the 4 tests (2 cells x 2 metrics): the smallest p is multiplied by 4.
  ps = sorted(rows[c][m]["p_value"] for c in rows for m in ("gold", "rm_accuracy"))
  assert math.isclose(
    min(rows[c][m]["p_holm"] for c in rows for m in ("gold", "rm_accuracy")), 4 * ps[0]
  )
  acc = rows["rounds=3,strategy=random"]["rm_accuracy"]
  assert math.isclose(acc["mean"], 0.01) and not acc["resolved_holm"]
  shares = rows["rounds=3,strategy=random"]["labels_share_to_reach_one_round_gold"]
  # Seed 0 reaches 1.0 between 100 (0.8) and 200 (1.1) labels: 166.7 of 300.
  assert math.isclose(shares[0], (100 + 100 * 0.2 / 0.3) / 300)
  assert math.isclose(shares[2], 100 * (1.1 - 0.5) / (1.2 - 0.5) / 300)  # in round 1
  assert rows["rounds=3,strategy=x"]["labels_share_to_reach_one_round_gold"] == {0: None, 1: None}
  text = loop_study.report(str(tmp_path), results, "note")
  assert "| rounds=3,strategy=random | +0.300 [" in text and "(resolved) |" in text
  assert "| rounds=3,strategy=x | -0.200 [" in text and "0: never, 1: never |" in text
  saved = json.load(open(tmp_path / "loop_study.json"))["against_one_round"]
  assert [r["cell"] for r in saved] == ["rounds=3,strategy=random", "rounds=3,strategy=x"]


def test_no_one_round_cell_means_no_comparison():
  assert (
    loop_study.against_one_round({"rounds=3,strategy=random": {0: _run([1.0], [0.7], [1])}}) == []
  )


def _study(*args):
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.loop_study", *args],
    cwd=repo, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip


def test_report_only_reports_the_finished_cells_and_names_the_rest(tmp_path):
  runs = {
    ("rounds=1,strategy=random", 0): _run([1.0], [0.70], [300]),
    ("rounds=1,strategy=random", 1): _run([1.2], [0.72], [300]),
    ("rounds=3,strategy=random", 0): _run([0.8, 1.1, 1.3], [0.6, 0.65, 0.71], [100, 200, 300]),
  }
  for (cell, seed), run in runs.items():
    os.makedirs(tmp_path / cell / f"seed={seed}")
    with open(tmp_path / cell / f"seed={seed}" / "loop.json", "w") as f:
      json.dump(run, f)
  args = ("--report_only", f"--workdir={tmp_path}", "--rounds=1,3", "--strategies=random")
  done = _study(*args, "--seeds=0,1")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| rounds=3,strategy=random | +0.300 (one seed, no interval) |" in done.stdout
  md = (tmp_path / "loop_study.md").read_text()
  assert "Not finished, left out: rounds=3,strategy=random/seed=1." in md
  assert not (tmp_path / "sft").exists()  # nothing trained
  with open(tmp_path / "rounds=1,strategy=random" / "seed=1" / "loop.json", "w") as f:
    f.write('{"rounds": [')
  bad = _study(*args, "--seeds=0,1")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "rounds=1,strategy=random/seed=1/loop.json: not readable JSON" in bad.stderr
  empty = _study("--report_only", f"--workdir={tmp_path / 'none'}")
  assert empty.returncode == 2 and "FATAL no finished cell in" in empty.stderr
  assert not (tmp_path / "none").exists()  # a report writes nowhere new
