"""Tests for rlhf_jax.config_spec and the trainers' declared config checks."""

import glob
import os

import ml_collections
import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import config_utils
from rlhf_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.relpath(p, REPO)
  for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
  if os.path.basename(p) not in ("__init__.py", "common.py")
)


def _load(spec):
  return config_utils.load_config(os.path.join(REPO, spec))


@pytest.mark.parametrize("spec", [f"{c}{a}" for c in CONFIGS for a in ("", ":runlocal")])
def test_every_shipped_config_passes_its_trainers_spec(spec):
  # A declared check per field: a field without one would be refused as unknown.
  config_utils.validate(_load(spec))


def test_checks_are_typed_and_bounded():
  with pytest.raises(ConfigError, match=r"^config.x=True: must be an int, got bool\.$"):
    cs.Int(min=1)(True, "config.x", None)
  cs.Float(gt=0)(np.float32(0.5), "config.x", None)  # NumPy numbers are numbers
  for zero in (0.0, np.float32(0.0), np.int64(0)):
    with pytest.raises(ConfigError, match="must be > 0"):
      cs.Float(gt=0)(zero, "config.beta", None)
  with pytest.raises(ConfigError, match="finite"):
    cs.Float()(float("inf"), "config.x", None)
  with pytest.raises(
    ConfigError, match=r"config.name='adamm': expected one of .* \(did you mean 'adam'\?\)"
  ):
    cs.Choice("adam", "sgd")("adamm", "config.name", None)
  with pytest.raises(ConfigError, match=r"config.files\[1\]=3: must be a path string"):
    cs.Seq(cs.Path())(("", 3), "config.files", None)


def test_an_unknown_field_in_a_config_file_is_refused_with_the_closest_names():
  config = _load("configs/sft.py:runlocal")
  config.optim.learning_rate = 0.1  # a typo in a config file used to be ignored
  with pytest.raises(ConfigError, match=r"config.optim.learning_rate is not a known field"):
    config_utils.validate(config)


def test_upstream_stages_are_checked_only_when_they_will_be_trained(tmp_path):
  config = _load("configs/ppo.py:runlocal")
  config.sft.optim.lr = -1.0
  with pytest.raises(ConfigError, match=r"^config.sft.optim.lr=-1.0: must be > 0"):
    config_utils.validate(config)
  # With a finished SFT stage given, config.sft is never run: not checked.
  stage = tmp_path / "sft"
  stage.mkdir()
  (stage / "export.json").write_text('{"kind": "policy", "step": 3}')
  config.policy_init = str(stage)
  config_utils.validate(config)
  config.policy_init = str(tmp_path)  # not a finished stage
  with pytest.raises(ConfigError, match=r"config.policy_init=.*export.json is missing"):
    config_utils.validate(config)


def test_a_bad_config_writes_nothing(tmp_path):
  config = _load("configs/sft.py:runlocal")
  config.keep_checkpoints = 0
  with pytest.raises(ConfigError, match=r"config\.keep_checkpoints=0"):
    config_utils.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_spec_for_a_forked_trainer_is_one_line_more():
  spec = cs.Spec({"trainer": cs.Str(), "lr": cs.Float(gt=0)}).extend({"warmup": cs.Int(min=0)})
  spec.validate(ml_collections.ConfigDict({"trainer": "mine", "lr": 0.1, "warmup": 3}))
  with pytest.raises(ConfigError, match=r"config lacks the field\(s\) config.warmup"):
    spec.validate(ml_collections.ConfigDict({"trainer": "mine", "lr": 0.1}))
