"""The monitor inside an RL stage: metrics, alerts, a stop, and the best policy kept."""

import glob
import json
import os

import numpy as np

from rlhf_jax import config_utils, metrics, sharding, stages
from rlhf_jax.monitor import alerts as alerts_lib
from tests.exporters import test_wandb
from tests.trainers import resume

REPO = resume.REPO


def _ppo(reward_dir, **changes):
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  config.update(changes)
  return config


def test_an_alert_stops_ppo_which_exports_there_and_keeps_the_best_policy(
  reward_runlocal, tmp_path, monkeypatch
):
  _, reward_dir, _ = reward_runlocal
  config = _ppo(reward_dir, total_steps=12, eval_every=2, log_every=2, checkpoint_every=4)
  # The metrics and alerts also go to an offline Weights & Biases run (rlhf_jax/exporters).
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  config.exporters.wandb.project = "rlhf-jax-test"
  # A stop rule certain to fire: any KL to the reference after the first updates.
  config.monitor.alerts.too_far = alerts_lib.rule_config(
    "eval/kl_to_ref", ">", 1e-6, action="stop", severity="critical", why="test"
  )
  workdir = str(tmp_path / "ppo")
  final = config_utils.run(config, workdir)

  rows = metrics.read_metrics(workdir)
  evals = [r for r in rows if "eval/gold_reward" in r]
  assert [r["step"] for r in evals] == [0, 2]  # stopped at the first eval past step 0
  assert any(k.startswith("monitor/") for k in evals[-1]) and evals[-1]["monitor/alerts"] >= 1
  # The runlocal reward model has two members: the evaluator scores with each.
  assert evals[0]["monitor/ensemble_disagreement_ratio"] == 1.0
  assert evals[-1]["monitor/ensemble_disagreement"] > 0
  meta = stages.read_meta(workdir)
  assert meta["step"] == 2 and stages.is_complete(workdir)
  assert final["eval/gold_reward"] == evals[-1]["eval/gold_reward"]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["stopped_by_alert_at"] == 2 and "too_far" in summary["alert_rules_fired"]
  (stop,) = [a for a in alerts_lib.read(workdir) if a.rule == "too_far"]
  assert stop.step == 2 and stop.action == "stop"

  # The best policy by gold is a finished stage of its own, loadable like any policy.
  best = summary["best"]
  golds = {r["step"]: r["eval/gold_reward"] for r in evals}
  assert best["step"] == max(golds, key=golds.get) and best["value"] == max(golds.values())
  best_dir = os.path.join(workdir, best["dir"])
  best_meta = stages.read_meta(best_dir)
  assert best_meta["kind"] == "policy" and best_meta["step"] == best["step"]
  policy = stages.load_policy(best_dir, sharding.make_mesh((1, -1, 1)))
  assert np.isfinite(np.asarray(jax_leaf(policy.params))).all()

  # The W&B run holds every logged line: the eval lines with the monitor's metrics.
  runs = glob.glob(os.path.join(workdir, "wandb", "*", "run-*.wandb"))
  (wandb_file,) = [r for r in runs if "latest-run" not in r]  # that one is a link
  logged = test_wandb.history(test_wandb.finished_records(wandb_file))
  assert logged[2]["eval/gold_reward"] == evals[-1]["eval/gold_reward"]
  assert logged[2]["monitor/alerts"] == evals[-1]["monitor/alerts"]

  # A rerun finds the stage finished: it does not train on past the stop.
  config_utils.run(config, workdir)
  assert metrics.read_metrics(workdir) == rows
  assert stages.read_meta(workdir)["step"] == 2


def jax_leaf(tree):
  import jax

  return jax.tree.leaves(tree)[0]
