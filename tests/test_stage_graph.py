"""The launcher resolves the stage graph; trainers only load finished stages."""

import ast
import os

import pytest

from rlhf_jax import config_utils, errors, stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  return config_utils.load_config(os.path.join(REPO, f"configs/{name}.py:runlocal"))


def test_upstream_stages_follow_the_specs():
  assert config_utils.upstream_stages(_load("ppo")) == [
    ("sft", "policy_init"),
    ("reward", "reward_init"),
  ]
  assert config_utils.upstream_stages(_load("reward")) == [("sft", "policy_init")]
  assert config_utils.upstream_stages(_load("sft")) == []
  grpo = _load("grpo")
  grpo.reward_fn = "gold"  # a host reward needs no reward model
  assert config_utils.upstream_stages(grpo) == [("sft", "policy_init")]
  grpo.policy_init = "/somewhere/sft"
  assert config_utils.upstream_stages(grpo) == []


def test_resolve_trains_missing_stages_in_order_and_hands_the_sft_down(tmp_path, monkeypatch):
  trained = []
  finished = {str(tmp_path / "sft")}  # found: not trained again

  def fake_run(config, workdir, timings):
    trained.append((config.trainer, workdir, config.get("policy_init")))
    timings.append(dict(stage=config.trainer, workdir=workdir, seconds=1.0, reused=False))
    finished.add(workdir)

  monkeypatch.setattr(config_utils, "run", fake_run)
  monkeypatch.setattr(stages, "is_complete", lambda workdir: workdir in finished)
  config = _load("ppo")
  timings = []
  resolved = config_utils.resolve_upstream(config, str(tmp_path), timings=timings)
  assert trained == [("reward", str(tmp_path / "reward"), str(tmp_path / "sft"))]
  assert [(t["stage"], t["reused"]) for t in timings] == [("sft", True), ("reward", False)]
  assert resolved.policy_init == str(tmp_path / "sft")
  assert resolved.reward_init == str(tmp_path / "reward")
  assert config.policy_init == "" and config.reward_init == ""  # the given config is unchanged


def test_a_trainer_without_its_stage_says_how_to_run_it():
  config = _load("ppo")
  with pytest.raises(errors.StageError, match=r"config\.policy_init is empty"):
    config_utils.require_stage(config, "policy_init")


def test_no_trainer_imports_a_trainer_or_runs_a_config():
  """Trainers only train: the graph is the launcher's (config_utils.run). The one exception
  is the feedback loop, whose rounds are stages: it runs them through config_utils.run, and
  still imports no trainer."""
  folder = os.path.join(REPO, "rlhf_jax", "trainers")
  trainers = {name[:-3] for name in os.listdir(folder) if name.endswith(".py")}
  trainers -= {"__init__", "common", "rl_common"}
  for name in sorted(trainers | {"common", "rl_common"}):
    with open(os.path.join(folder, f"{name}.py")) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "rlhf_jax.trainers":
        imported = {alias.name for alias in node.names}
        assert not imported & trainers, (name, imported & trainers)
      if name == "loop":
        continue
      if isinstance(node, ast.Attribute) and node.attr in ("run", "resolve_upstream"):
        base = node.value
        assert not (isinstance(base, ast.Name) and base.id == "config_utils"), name
