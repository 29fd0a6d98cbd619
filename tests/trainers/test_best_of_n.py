"""Best-of-n: the gold/proxy-vs-KL curve on finished stages, resume, config errors."""

import itertools
import json
import os
import signal

import numpy as np
import pytest

from rlhf_jax import config_utils, metrics
from rlhf_jax.rl import best_of_n as bon_lib
from rlhf_jax.trainers import best_of_n
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runlocal_config(reward_dir):
  config = config_utils.load_config(os.path.join(REPO, "configs/best_of_n.py:runlocal"))
  config.policy_init = os.path.join(reward_dir, "sft")
  config.reward_init = reward_dir
  return config


@pytest.mark.slow
def test_runlocal_curve(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  config = runlocal_config(reward_dir)
  workdir = str(tmp_path / "bon")
  config_utils.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2, 4, 8, 16]
  curve = rows[1:]
  for r in curve:
    np.testing.assert_allclose(r["eval/kl_to_ref"], float(bon_lib.analytic_kl(r["step"])))
  # The proxy is what best-of-n maximises: its expectation rises with n.
  proxy = [r["eval/proxy_reward"] for r in curve]
  assert all(b > a for a, b in itertools.pairwise(proxy))
  # n = 1 is plain SFT sampling: its gold is the candidates' mean gold.
  candidates = [
    json.load(open(os.path.join(workdir, "candidates", f)))
    for f in sorted(os.listdir(os.path.join(workdir, "candidates")))
  ]
  gold = np.concatenate([np.asarray(c["gold"]) for c in candidates])
  assert gold.shape == (config.eval.num_prompts, config.num_samples)
  np.testing.assert_allclose(curve[0]["eval/gold_reward"], gold.mean(), rtol=1e-5)
  # Best-of-16 picks the top-scored of the 16 samples.
  scores = np.concatenate([np.asarray(c["scores"]) for c in candidates])
  top = gold[np.arange(len(gold)), scores.argmax(-1)].mean()
  np.testing.assert_allclose(curve[-1]["eval/gold_reward"], top, rtol=1e-5)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["method"] == "best_of_n" and summary["n"] == 16
  assert summary["kl_to_ref"] == pytest.approx(float(bon_lib.analytic_kl(16)))
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000016.jsonl"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_curve(reward_runlocal, tmp_path):
  _, reward_dir, _ = reward_runlocal
  overrides = [
    f"--config.policy_init={os.path.join(reward_dir, 'sft')}",
    f"--config.reward_init={reward_dir}",
    "--config.eval.num_prompts=16",
    "--config.prompts_per_chunk=2",
  ]
  config = "configs/best_of_n.py:runlocal"
  cache = str(tmp_path / "jax_cache")
  reference = str(tmp_path / "straight")
  resume.run_to_end(config, reference, overrides, cache)

  killed = str(tmp_path / "killed")
  proc = resume.launch(config, killed, overrides, cache)
  chunks = os.path.join(killed, "candidates")
  ready = lambda: os.path.isdir(chunks) and len(os.listdir(chunks)) >= 2
  code, out = resume.signal_when(proc, ready, signal.SIGKILL, timeout=600)
  assert code == -signal.SIGKILL, out[-3000:]
  assert 2 <= len(os.listdir(chunks)) < 8, "the kill must land mid-run"
  resume.run_to_end(config, killed, overrides, cache)
  assert metrics.read_metrics(killed) == metrics.read_metrics(reference)
  for name in sorted(os.listdir(os.path.join(reference, "samples"))):
    with open(os.path.join(reference, "samples", name)) as a:
      with open(os.path.join(killed, "samples", name)) as b:
        assert a.read() == b.read(), name


def test_config_errors():
  config = config_utils.load_config(os.path.join(REPO, "configs/best_of_n.py:runlocal"))
  config.ns = (1, 32)
  with pytest.raises(ValueError, match=r"n=32 > config\.num_samples=16"):
    best_of_n.check_config(config)
  config.ns = (0, 2)
  with pytest.raises(ValueError, match=r"config\.ns"):
    best_of_n.check_config(config)
