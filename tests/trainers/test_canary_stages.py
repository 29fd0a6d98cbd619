"""experiments/canary.py end to end: a PPO policy against its SFT start, then an over-optimised
one. Both are trained here from the shared reward runlocal stage (`reward_runlocal`, whose
SFT policy is <reward_dir>/sft) and judged by gold, the rater panel and the reward model."""

import os

import pytest

from experiments import canary
from rlhf_jax import config_utils, sharding
from rlhf_jax.data import testbed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ppo(workdir, policy_init, reward_dir, **overrides):
  """configs/ppo.py:runlocal from `policy_init` with `reward_dir`, evaluated only at the end."""
  config = config_utils.load_config(os.path.join(REPO, "configs/ppo.py:runlocal"))
  config.policy_init, config.reward_init = policy_init, reward_dir
  config.eval.num_prompts = 16  # the stage's own eval; the canary draws its own prompts
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  config.eval_every = config.total_steps
  config_utils.run(config, workdir)
  return workdir


@pytest.mark.slow
def test_canary_promotes_ppo_and_stops_an_over_optimised_policy(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  sft_dir = os.path.join(reward_dir, "sft")
  mesh = sharding.make_mesh((1, -1, 1))
  prompts = testbed.prompts("eval", 64, 0)

  def judge(candidate):
    report = canary.compare(
      sft_dir, candidate, prompts, mesh=mesh, testbed_prompts=True, panel=True,
      reward_model=reward_dir,
    )  # fmt: skip
    canary.write(report, str(tmp_path / f"canary_{os.path.basename(candidate)}"))
    print(canary.markdown(report))  # shown with -s: the figures behind the verdict
    return report

  # The runlocal PPO raises gold by about +1 on this tiny policy: a clear promotion.
  ppo_dir = _ppo(str(tmp_path / "ppo"), sft_dir, reward_dir)
  good = judge(ppo_dir)
  assert good["verdict"] == canary.PROMOTE, good["reasons"]
  assert good["primary"] == "judge" and good["judges"]["judge"]["name"] == "gold"
  gold = good["judges"]["judge"]
  assert gold["low"] > 0.5 and gold["gain"] > 0.4
  assert good["reasons"][0].startswith("judge gold: win rate")
  assert good["reasons"][1].startswith("no detector flags (kl: ")
  assert 0.5 < good["kl"]["candidate_vs_baseline"] < good["thresholds"]["max_kl"]
  assert good["judges"]["panel"]["win_rate"] > 0.5

  # Over-optimised: the PPO policy trained on with no KL penalty at 3x the learning rate.
  # The proxy keeps rising while gold falls below the SFT policy's and the responses loop
  # (with this reward model: KL ~70 nats, gold win rate ~0.3, the reward model's ~1.0).
  hacked_dir = _ppo(
    str(tmp_path / "hacked"), ppo_dir, reward_dir,
    **{"kl.init_coef": 0.0, "kl.controller": "fixed", "optim.lr": 3e-3, "total_steps": 15},
  )  # fmt: skip
  bad = judge(hacked_dir)
  assert bad["verdict"] in (canary.HOLD, canary.ROLL_BACK), bad["reasons"]
  flagged = {c["name"] for c in bad["checks"] if c["flagged"]}
  assert "kl" in flagged and flagged & {"repetition", "reward_hacking"}, bad["checks"]
  assert any(r.startswith("kl: KL(candidate || baseline) = ") for r in bad["reasons"])
  # The proxy rose and gold fell, relative to the healthy PPO policy.
  rm, gold = bad["judges"]["reward_model"], bad["judges"]["judge"]
  assert rm["candidate_mean"] > good["judges"]["reward_model"]["candidate_mean"]
  assert gold["candidate_mean"] < good["judges"]["judge"]["candidate_mean"]
  assert rm["low"] > 0.5 and gold["win_rate"] < good["judges"]["judge"]["win_rate"]
