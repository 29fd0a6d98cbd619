"""Shared trained stages: the reward runlocal run (with its SFT stage) serves PPO too."""

import os

import pytest

from rlhf_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def reward_runlocal(tmp_path_factory):
  """configs/reward.py:runlocal trained from scratch (SFT on demand): (config, workdir, final)."""
  workdir = str(tmp_path_factory.mktemp("reward"))
  config = config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))
  final = config_utils.run(config, workdir)
  return config, workdir, final
