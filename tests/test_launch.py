"""Tests for experiments/launch.py, rlhf_jax/config_utils.py and configs/common.py.

The end-to-end cases run the launcher as a subprocess, exactly as a user would, with the
fixture config tests/fixtures/dummy_config.py, whose trainer (tests/fixtures/dummy_trainer.py)
writes the config it received to `<workdir>/dummy_trainer.json`.
"""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from rlhf_jax import config_utils, utils
from tests.fixtures import dummy_trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMMY_CONFIG = "tests/fixtures/dummy_config.py"
DUMMY_TRAINER = "tests.fixtures.dummy_trainer"

# Cluster variables would switch on jax.distributed in the child; CI may run inside SLURM.
_CLUSTER_VARS = (
  *config_utils._DISTRIBUTED_ENV_VARS,
  *config_utils._DISTRIBUTED_COUNT_VARS,
  *config_utils._TPU_HOST_LIST_VARS,
)


def _launch(*args, cwd=REPO_ROOT):
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
  return subprocess.run(
    [sys.executable, "-m", "experiments.launch", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _assert_clean_failure(result):
  """A refused command: non-zero exit, a message, and no traceback."""
  assert result.returncode != 0, result.stderr
  assert "Traceback" not in result.stderr, result.stderr


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------
# End to end: python -m experiments.launch.
# ------------------------------------------------------------------------------------------------


def test_launch_applies_arg_and_overrides_and_writes_config_json(tmp_path):
  workdir = tmp_path / "run"
  result = _launch(
    f"--config={DUMMY_CONFIG}:runlocal,seed=3",
    "--config.optim.lr=0.002",
    "--config.total_steps=7",
    "--config.use_remat",
    "--config.optim.eps=1e-6",
    f"--workdir={workdir}",
  )
  assert result.returncode == 0, result.stderr

  text = (workdir / "config.json").read_text()
  written = json.loads(text)
  assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"  # sorted, stable
  assert written["optim"]["lr"] == 0.002
  assert written["optim"]["eps"] == 1e-6  # a typed placeholder takes a float
  assert written["total_steps"] == 7  # the override beats runlocal's 3
  assert written["batch_size"] == 2  # from runlocal
  assert written["seed"] == 3  # from the arg string, as an int
  assert written["use_remat"] is True
  assert written["trainer"] == DUMMY_TRAINER

  ran = _read_json(workdir / dummy_trainer.OUTPUT_FILENAME)
  assert ran["config"] == written  # the trainer saw exactly what config.json records
  assert ran["workdir"] == str(workdir)
  assert ran["is_locked"] is True  # lock_config=True: typos in the trainer fail loudly
  assert "Resolved config" in result.stderr  # process 0 logs the config at INFO
  assert "backend cpu" in result.stderr  # and the JAX backend/devices


def test_launch_refuses_unknown_key_and_suggests_the_close_one(tmp_path):
  workdir = tmp_path / "run"
  result = _launch(f"--config={DUMMY_CONFIG}", "--config.optim.lrr=1e-3", f"--workdir={workdir}")
  _assert_clean_failure(result)
  assert "Unknown config key config.optim.lrr" in result.stderr
  assert "Did you mean config.optim.lr?" in result.stderr
  assert not workdir.exists()


def test_launch_refuses_wrong_type_naming_the_key(tmp_path):
  workdir = tmp_path / "run"
  result = _launch(f"--config={DUMMY_CONFIG}", "--config.total_steps=abc", f"--workdir={workdir}")
  _assert_clean_failure(result)
  assert "config.total_steps" in result.stderr
  assert "expected int" in result.stderr
  assert not workdir.exists()


def test_launch_default_workdir_is_runs_stem_arg(tmp_path):
  # cwd is a temporary folder, so the default runs/ lands there and not in the repo.
  config_path = os.path.join(REPO_ROOT, DUMMY_CONFIG)
  result = _launch(f"--config={config_path}:runlocal", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  workdir = tmp_path / "runs" / "dummy_config_runlocal"
  assert _read_json(workdir / "config.json")["total_steps"] == 3
  assert _read_json(workdir / dummy_trainer.OUTPUT_FILENAME)["workdir"] == os.path.join(
    "runs", "dummy_config_runlocal"
  )


def test_launch_unknown_trainer_names_the_field(tmp_path):
  workdir = tmp_path / "run"
  result = _launch(
    f"--config={DUMMY_CONFIG}", "--config.trainer=no_such_trainer", f"--workdir={workdir}"
  )
  _assert_clean_failure(result)
  assert "config.trainer = 'no_such_trainer'" in result.stderr
  assert "Available trainers in rlhf_jax/trainers/" in result.stderr
  assert not (workdir / "config.json").exists()  # nothing written for a config that cannot run


FAILING = "tests/fixtures/failing_config.py"


def test_an_rlhf_jax_error_is_one_line_and_a_hint_with_exit_2(tmp_path):
  result = _launch(f"--config={FAILING}", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert result.stderr.endswith(
    "FATAL data error: data/x.jsonl:3: field 'chosen' is missing\nFix it.\n"
  ), result.stderr[-500:]
  assert "Traceback" not in result.stderr
  # --verbose shows where it came from too.
  verbose = _launch(f"--config={FAILING}", f"--workdir={tmp_path}", "--verbose")
  assert verbose.returncode == 2
  assert "Traceback" in verbose.stderr and "failing_trainer.py" in verbose.stderr
  assert "FATAL data error: data/x.jsonl:3" in verbose.stderr


def test_an_error_in_an_upstream_stage_names_that_stage(tmp_path):
  result = _launch(f"--config={FAILING}:upstream", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert f"(in the upstream stage {tmp_path / 'up'})" in result.stderr


def test_any_other_exception_is_a_bug_and_keeps_its_traceback(tmp_path):
  result = _launch(f"--config={FAILING}:bug", f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "RuntimeError: a bug in the trainer" in result.stderr


def test_flag_mistakes_exit_2(tmp_path):
  result = _launch(f"--config={DUMMY_CONFIG}", "--config.optim.lrr=1e-3", f"--workdir={tmp_path}")
  assert result.returncode == 2


# ------------------------------------------------------------------------------------------------
# configs/common.parse_arg.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", [None, ""])
def test_parse_arg_keeps_defaults_without_arg(arg):
  parsed = common.parse_arg(arg, runlocal=False, seed=0, size="small")
  assert parsed.to_dict() == {"runlocal": False, "seed": 0, "size": "small"}


def test_parse_arg_types_values_like_the_defaults():
  parsed = common.parse_arg(
    "runlocal, seed=3,size=base,,lr=3,dropout=1e-1",
    runlocal=False,
    seed=0,
    size="small",
    lr=0.1,
    dropout=0.0,
  )
  assert isinstance(parsed, ml_collections.ConfigDict)
  assert parsed.runlocal is True
  assert parsed.seed == 3 and type(parsed.seed) is int
  assert parsed.size == "base"
  assert parsed.lr == 3.0 and type(parsed.lr) is float  # an int-looking value for a float key
  assert parsed.dropout == 0.1


@pytest.mark.parametrize(
  "text, expected", [("true", True), ("False", False), ("1", True), ("no", False)]
)
def test_parse_arg_bool_values(text, expected):
  assert common.parse_arg(f"runlocal={text}", runlocal=not expected).runlocal is expected


def test_parse_arg_last_repeat_wins_and_none_default_keeps_text():
  parsed = common.parse_arg("seed=1,seed=2,init=gs://bucket/x", seed=0, init=None)
  assert parsed.seed == 2
  assert parsed.init == "gs://bucket/x"


def test_parse_arg_unknown_key_names_it_and_lists_known_keys():
  with pytest.raises(ValueError, match=r"'runlocl'.*known keys: runlocal, seed"):
    common.parse_arg("runlocl", runlocal=False, seed=0)


@pytest.mark.parametrize(
  "arg, match",
  [
    ("seed", r"'seed' needs a value"),  # bare words are for bools only
    ("seed=1.5", r"seed='1.5': expected int"),
    ("runlocal=maybe", r"runlocal='maybe': expected a bool"),
  ],
)
def test_parse_arg_refuses_bad_values(arg, match):
  with pytest.raises(ValueError, match=match):
    common.parse_arg(arg, runlocal=False, seed=0)


def test_parse_arg_refuses_unsupported_default_type():
  with pytest.raises(TypeError, match="mesh"):
    common.parse_arg(None, mesh=(1, 8))


# ------------------------------------------------------------------------------------------------
# rlhf_jax/config_utils.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "spec, expected",
  [
    ("configs/sft.py", "runs/sft"),
    ("configs/sft.py:runlocal", "runs/sft_runlocal"),
    ("configs/sft.py:runlocal,seed=3", "runs/sft_runlocal_seed=3"),
    ("configs/ppo.py:size=1.4b", "runs/ppo_size=1.4b"),
    ("configs/ppo.py:", "runs/ppo"),
    ("/abs/path/dpo.py:init=gs://b/x", "runs/dpo_init=gs_b_x"),
  ],
)
def test_default_workdir(spec, expected):
  assert config_utils.default_workdir(spec) == expected


def test_load_config_passes_the_arg():
  config = config_utils.load_config(os.path.join(REPO_ROOT, DUMMY_CONFIG) + ":runlocal,seed=5")
  assert config.total_steps == 3 and config.seed == 5
  assert config_utils.load_config(os.path.join(REPO_ROOT, DUMMY_CONFIG)).total_steps == 1000
  with pytest.raises(config_utils.ConfigError, match="not found"):
    config_utils.load_config("no/such/config.py:runlocal")


def _dummy_config():
  return config_utils.load_config(os.path.join(REPO_ROOT, DUMMY_CONFIG))


@pytest.mark.parametrize(
  "key, suggestion, section",
  [
    ("optim.lrr", "config.optim.lr", "config.optim"),
    ("optimizer.lr", "config.optim.lr", "config"),
    ("lr", "config.optim.lr", "config"),  # a leaf name in the wrong section
    ("totl_steps", "config.total_steps", "config"),
  ],
)
def test_check_key_suggests_nearest(key, suggestion, section):
  with pytest.raises(config_utils.ConfigError) as info:
    config_utils.check_key(_dummy_config(), key)
  message = str(info.value)
  assert f"Unknown config key config.{key}" in message
  assert f"Did you mean {suggestion}?" in message
  assert f"Keys in {section}:" in message


def test_check_key_accepts_existing_and_refuses_children_of_leaves():
  config = _dummy_config()
  config_utils.check_key(config, "optim.lr")
  config_utils.check_key(config, "optim")
  with pytest.raises(config_utils.ConfigError, match=r"config\.seed holds the int 0"):
    config_utils.check_key(config, "seed.value")


def test_launch_explains_why_a_none_field_cannot_be_overridden(tmp_path):
  config_file = tmp_path / "none_config.py"
  config_file.write_text(
    '"""A config with a None field."""\n'
    "import ml_collections\n\n\n"
    "def get_config():\n"
    "  return ml_collections.ConfigDict({'trainer': 'x', 'init': None, 'seed': 0})\n"
  )
  result = _launch(f"--config={config_file}", "--config.seed=1", "--config.init=gs://b/ckpt")
  _assert_clean_failure(result)
  assert "Cannot override config.init (from --config.init=gs://b/ckpt)" in result.stderr
  assert "placeholder" in result.stderr


def test_parse_override_args_mirrors_config_flags_syntax():
  argv = ["x", "--config=c.py", "--config.a.b=1", "--noconfig.flag", "--config.c", "2", "-config.d"]
  assert config_utils.parse_override_args(argv) == {
    "a.b": "1",
    "flag": "false",
    "c": "2",
    "d": None,
  }
  assert config_utils.find_config_spec(argv) == "c.py"
  assert config_utils.find_config_spec(["x", "--config", "d.py:runlocal"]) == "d.py:runlocal"


def test_run_writes_resolved_config_and_calls_trainer(tmp_path):
  config = _dummy_config()
  config.eval_every = 50  # checkpoint_every references it
  config.optim.freeze = ("embedder/.*",)
  workdir = str(tmp_path / "run")
  record = config_utils.run(config, workdir)
  written = _read_json(os.path.join(workdir, "config.json"))
  assert written["checkpoint_every"] == 50  # FieldReference resolved
  assert written["optim"]["freeze"] == ["embedder/.*"]
  assert record["config"]["eval_every"] == 50  # train's result is returned
  assert config_utils.read_config_json(workdir).optim.lr == config.optim.lr
  assert [name for name in os.listdir(workdir) if name.endswith(".tmp")] == []  # atomic write


def test_rerun_with_changed_config_warns(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config_utils.write_config_json(_dummy_config(), workdir)
  config = _dummy_config()
  config.optim.lr = 1.0
  with caplog.at_level("WARNING"):
    config_utils.write_config_json(config, workdir)
  assert "differs from this run's config in: optim.lr." in caplog.text
  assert config_utils.read_config_json(workdir).optim.lr == 1.0


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".run_lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"host elsewhere, pid {os.getpid()}, since then".encode())
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_a_workdir_is_refused_until_the_first_one_dies(tmp_path):
  """Two processes never train in one folder: the second is refused before it writes
  anything, and the lock dies with its holder (killed, not stale)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(config_utils.ConfigError) as refused:
      config_utils.run(_dummy_config(), str(workdir))
    assert str(refused.value) == (
      f"{workdir} is in use by another process (host elsewhere, pid {holder.pid}, since then): "
      "wait for it to finish or use another workdir."
    )
    assert sorted(os.listdir(workdir)) == [".run_lock"]  # no config.json, no trainer output
  finally:
    holder.kill()
    holder.wait()
  record = config_utils.run(_dummy_config(), str(workdir))
  assert record["workdir"] == str(workdir)
  assert f"pid {os.getpid()}," in (workdir / ".run_lock").read_text()


def test_the_run_lock_is_held_while_the_trainer_runs_and_let_go_after(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  seen = []

  def probe(config, workdir):
    with pytest.raises(config_utils.ConfigError, match="is in use by another process"):
      with utils.exclusive_dir(workdir, config_utils.RUN_LOCK):
        pass
    seen.append(workdir)
    raise config_utils.ConfigError("the trainer failed")

  monkeypatch.setattr(dummy_trainer, "train", probe)
  with pytest.raises(config_utils.ConfigError, match="the trainer failed"):
    config_utils.run(_dummy_config(), workdir)
  assert seen == [workdir]
  with utils.exclusive_dir(workdir, config_utils.RUN_LOCK):  # released on the error too
    pass


def test_run_refuses_config_without_trainer(tmp_path):
  with pytest.raises(config_utils.ConfigError, match=r"no field config\.trainer"):
    config_utils.run(ml_collections.ConfigDict({"seed": 0}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_run_refuses_values_json_cannot_store(tmp_path):
  config = ml_collections.ConfigDict({"trainer": DUMMY_TRAINER, "model": {"dtype": object()}})
  with pytest.raises(config_utils.ConfigError, match=r"config\.model\.dtype"):
    config_utils.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_config_json_writes_non_finite_floats_as_strings():
  config = ml_collections.ConfigDict({"clip": float("inf"), "nested": {"x": float("nan")}})
  assert json.loads(config_utils.config_to_json(config)) == {"clip": "inf", "nested": {"x": "nan"}}


def test_get_trainer_unknown_name_lists_available(monkeypatch):
  # Pointed at tests/fixtures, whose modules are known, so the listing can be checked exactly.
  monkeypatch.setattr(config_utils, "TRAINERS_PACKAGE", "tests.fixtures")
  with pytest.raises(config_utils.ConfigError) as info:
    config_utils.get_trainer("dummy_trainr")
  message = str(info.value)
  assert "config.trainer = 'dummy_trainr'" in message
  assert "Did you mean 'dummy_trainer'?" in message
  # dummy_config has no train function, so it is not offered as a trainer.
  assert message.endswith(
    "Available trainers in rlhf_jax/trainers/: broken_trainer, collective_trainer, "
    "dummy_trainer, failing_trainer, sweep_trainer."
  )
  assert config_utils.get_trainer("dummy_trainer") is dummy_trainer.train


def test_get_trainer_dotted_name_and_errors():
  assert config_utils.get_trainer(DUMMY_TRAINER) is dummy_trainer.train
  with pytest.raises(config_utils.ConfigError, match=r"no module tests\.fixtures\.nope"):
    config_utils.get_trainer("tests.fixtures.nope")
  with pytest.raises(config_utils.ConfigError, match="has no train"):
    config_utils.get_trainer("tests.fixtures.dummy_config")
  with pytest.raises(config_utils.ConfigError, match="non-empty string"):
    config_utils.get_trainer(3)
  # A trainer that exists but cannot import a dependency is not a config typo.
  with pytest.raises(ModuleNotFoundError, match="rlhf_jax_no_such_dependency"):
    config_utils.get_trainer("tests.fixtures.broken_trainer")


@pytest.mark.parametrize(
  "environ, detected",
  [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
  ],
)
def test_detect_distributed(environ, detected):
  assert (config_utils.detect_distributed(environ) is not None) is detected
