"""Shared trained stages: the reward runlocal run (with its SFT stage) serves PPO too."""

import os

import pytest

from rlhf_jax import config_utils
from tests import shared

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config():
  return config_utils.load_config(os.path.join(REPO, "configs/reward.py:runlocal"))


@pytest.fixture(scope="session")
def reward_runlocal(tmp_path_factory):
  """configs/reward.py:runlocal trained from scratch (SFT on demand): (config, workdir, final).

  Trained once per test run, whichever xdist worker asks first; the workdir is shared.
  """

  def build(workdir):
    return workdir, config_utils.run(_config(), workdir)

  workdir, final = shared.once(tmp_path_factory, "reward_runlocal", build)
  return _config(), workdir, final
