"""The whole pipeline on one's own files, with no testbed module imported anywhere on the path.

The worked example of docs/own_data.md, on its files in docs/examples/own_data/: SFT on a
hand-written JSONL file (text and chat records), a proxy reward model and a judge reward
model on two preference files with different labels, then PPO, GRPO, RLOO and best-of-n on
a prompt file (text and chat records) evaluated by the judge. The runs happen in a subprocess
whose import system refuses `rlhf_jax.data.testbed`: any use of the testbed on this path
would fail the run. Configs are made here from the shipped config files (which hold the
testbed's knobs as plain data) and handed over as JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import config_utils, metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXAMPLE = os.path.join(REPO, "docs", "examples", "own_data")
NUM_PROMPTS = 24  # distinct prompts of prompts.jsonl (one more, too long, is left out)

_RUNNER = r"""
import importlib.abc, json, sys, time
start = time.perf_counter()

class NoTestbed(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "rlhf_jax.data.testbed" or name.startswith("rlhf_jax.data.testbed."):
      raise ImportError(f"{name} imported on a path that must not use the testbed")
    return None

sys.meta_path.insert(0, NoTestbed())
import ml_collections
from rlhf_jax import config_utils

for name, config, workdir in json.load(open(sys.argv[1])):
  config_utils.run(ml_collections.ConfigDict(config), workdir)
  print("finished", name, round(time.perf_counter() - start, 1), flush=True)
assert not [m for m in sys.modules if m.startswith("rlhf_jax.data.testbed")]
"""


def _config(name, **overrides):
  config = config_utils.load_config(os.path.join(REPO, f"configs/{name}.py:runlocal"))
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config.to_dict()


@pytest.mark.slow
def test_pipeline_on_own_files_with_judge_and_no_testbed(tmp_path):
  files = {name: os.path.join(EXAMPLE, f"{name}.jsonl") for name in
           ("sft", "prefs", "judge_prefs", "prompts")}  # fmt: skip
  sft_file, proxy_pairs, judge_pairs, prompt_file = files.values()
  w = lambda name: str(tmp_path / name)
  small = {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2}
  rl_common = {
    **small,
    "policy_init": w("sft"),
    "reward_init": w("proxy_rm"),
    "data.source": "jsonl",
    "data.prompts": prompt_file,
    "eval.judge": "rm:" + w("judge_rm"),
    "eval.num_prompts": 8,
    "prompt_len": 48,
    "max_new_tokens": 8,
  }
  reward = {
    "policy_init": w("sft"),
    "data.source": "jsonl",
    "total_steps": 6,
    "eval_every": 6,
    "checkpoint_every": 6,
    "log_every": 3,
    "optim.warmup_steps": 1,
    "normalize_samples": 16,
    "data.sample_batch": 16,
    "data.responses_per_prompt": 3,
  }
  runs = [
    (
      "sft",
      _config(
        "sft",
        **{
          "data.source": "jsonl",
          "data.train_jsonl": sft_file,
          "total_steps": 20,
          "eval_every": 20,
          "checkpoint_every": 20,
          "eval.num_samples": 8,
          "tokenizer.vocab_size": 96,
        },
      ),
      w("sft"),
    ),
    (
      "proxy_rm",
      _config("reward", **reward, **{"data.train_files": (proxy_pairs,)}),
      w("proxy_rm"),
    ),
    (
      "judge_rm",
      _config("reward", **reward, **{"data.train_files": (judge_pairs,), "seed": 1}),
      w("judge_rm"),
    ),
    (
      "ppo",
      _config("ppo", **rl_common, rollout_batch_size=16, minibatch_size=8, ppo_epochs=1),
      w("ppo"),
    ),
    (
      "grpo",
      _config("grpo", **rl_common, prompts_per_iter=4, group_size=4, minibatch_size=8),
      w("grpo"),
    ),
    (
      "rloo",
      _config("rloo", **rl_common, prompts_per_iter=4, group_size=4, minibatch_size=8),
      w("rloo"),
    ),
    (
      "best_of_n",
      _config(
        "best_of_n",
        **{k: v for k, v in rl_common.items() if k not in small},
        num_samples=2,
        ns=(1, 2),
        prompts_per_chunk=4,
      ),
      w("bon"),
    ),
  ]
  plan = tmp_path / "plan.json"
  plan.write_text(json.dumps(runs))
  # GRPO and RLOO (and every stage's evaluator) compile the same programs: a persistent
  # compilation cache makes the second compile a read.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=w("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  result = subprocess.run(
    [sys.executable, "-c", _RUNNER, str(plan)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  print(result.stdout)  # "finished <stage> <seconds>" per stage (pytest -s shows it)

  judge = "rm:" + os.path.abspath(w("judge_rm"))
  for name, workdir in (("ppo", "ppo"), ("grpo", "grpo"), ("rloo", "rloo"), ("best_of_n", "bon")):
    with open(os.path.join(w(workdir), "summary.json")) as f:
      summary = json.load(f)
    assert summary["evaluator"] == judge, name
    for key in ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_sft"):
      assert np.isfinite(summary[key]), (name, key)
    assert summary["win_rate_vs_sft_low"] <= summary["win_rate_vs_sft"]
    assert summary["win_rate_vs_sft"] <= summary["win_rate_vs_sft_high"]
    evals = [r for r in metrics.read_metrics(w(workdir)) if "eval/gold_reward" in r]
    assert evals[0]["eval/win_rate_vs_sft"] == 0.5  # the SFT policy against itself
    with open(os.path.join(w(workdir), "data_info.json")) as f:
      info = json.load(f)["prompts"]
    assert info["source"] == "jsonl" and info["num_eval"] == 8
    assert info["train_dropped_too_long"] == 1  # before the hold-out: eval gets 8 that fit
    assert info["num_train"] + info["num_eval"] == NUM_PROMPTS
